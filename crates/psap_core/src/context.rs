//! The language of a column's context expression: string constants and column names joined by
//! `||`, as in `'incidents.title:' || id`. Nothing else: no function, operator, cast, subquery,
//! parameter, comment or escape string, so an expression runs no code, cannot depend on a
//! setting (TimeZone, DateStyle, standard_conforming_strings) and always means the same text.
//!
//! The expression is parsed here, by this grammar alone (PostgreSQL's lexer is not involved), and
//! written back out by psap_encrypt itself: the form it stores ([`ContextExpr::canonical`]) and
//! the SQL it evaluates ([`ContextExpr::to_sql`]), with every constant and name quoted.
//!
//! ```text
//! expr  := term ( "||" term )*
//! term  := 'string'   -- '' stands for one quote; no backslash
//!        | name       -- [A-Za-z_][A-Za-z0-9_$]*, folded to lower case, or "Quoted ""name"""
//! ```

use std::fmt;

/// Longest expression accepted, in bytes.
pub const MAX_LEN: usize = 1000;
/// Longest name PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_NAME: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    Constant(String),
    Column(String),
}

/// A parsed context expression: its terms, in order, joined by `||`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextExpr {
    pub terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextError {
    Empty,
    TooLong,
    /// Something that is not part of the language, at this byte offset.
    Unexpected(usize),
    UnterminatedString,
    UnterminatedName,
    Backslash,
    NameTooLong,
    EmptyName,
    /// Only constants: the context would not tell one row from another.
    NoColumn,
    /// No constant with text in it: a row whose columns are empty text would have the empty
    /// context, which is an unbound value's (AES-256-GCM authenticates no associated data alike).
    NoConstant,
}

impl fmt::Display for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextError::Empty => write!(f, "the expression is empty"),
            ContextError::TooLong => write!(f, "the expression is longer than {MAX_LEN} bytes"),
            ContextError::Unexpected(at) => write!(
                f,
                "unexpected input at character {}: only 'constants' and column names joined by || are allowed",
                at + 1
            ),
            ContextError::UnterminatedString => write!(f, "a string constant is not closed"),
            ContextError::UnterminatedName => write!(f, "a quoted column name is not closed"),
            ContextError::Backslash => write!(f, "string constants cannot contain a backslash"),
            ContextError::NameTooLong => write!(f, "a column name is longer than {MAX_NAME} bytes"),
            ContextError::EmptyName => write!(f, "a quoted column name is empty"),
            ContextError::NoColumn => write!(f, "the expression names no column of the row"),
            ContextError::NoConstant => write!(
                f,
                "the expression has no 'constant' with text in it: a row whose columns are empty would be bound to nothing"
            ),
        }
    }
}

/// Parses a context expression.
pub fn parse(s: &str) -> Result<ContextExpr, ContextError> {
    if s.len() > MAX_LEN {
        return Err(ContextError::TooLong);
    }
    let b = s.as_bytes();
    let mut i = skip_space(b, 0);
    if i == b.len() {
        return Err(ContextError::Empty);
    }
    let mut terms = Vec::new();
    loop {
        let (term, next) = term(s, i)?;
        terms.push(term);
        i = skip_space(b, next);
        if i == b.len() {
            break;
        }
        if !b[i..].starts_with(b"||") {
            return Err(ContextError::Unexpected(i));
        }
        i = skip_space(b, i + 2);
        if i == b.len() {
            return Err(ContextError::Unexpected(i));
        }
    }
    if !terms.iter().any(|t| matches!(t, Term::Column(_))) {
        return Err(ContextError::NoColumn);
    }
    if !terms
        .iter()
        .any(|t| matches!(t, Term::Constant(c) if !c.is_empty()))
    {
        return Err(ContextError::NoConstant);
    }
    let expr = ContextExpr { terms };
    // What is stored (every name quoted) must parse again, so it is held to the limit too.
    if expr.canonical().len() > MAX_LEN {
        return Err(ContextError::TooLong);
    }
    Ok(expr)
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// One term starting at byte `i`; returns it and the offset after it.
fn term(s: &str, i: usize) -> Result<(Term, usize), ContextError> {
    let b = s.as_bytes();
    match b[i] {
        b'\'' => {
            let (text, next) = quoted(s, i, b'\'')?;
            if text.contains('\\') {
                return Err(ContextError::Backslash);
            }
            Ok((Term::Constant(text), next))
        }
        b'"' => {
            let (name, next) = quoted(s, i, b'"').map_err(|_| ContextError::UnterminatedName)?;
            check_name(&name)?;
            Ok((Term::Column(name), next))
        }
        c if c.is_ascii_alphabetic() || c == b'_' => {
            // The name runs to the first other character; what follows must be `||` or the
            // end (parse checks), so `id(`, `id.x` and `id::t` are refused there.
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'$') {
                j += 1;
            }
            let name = s[i..j].to_ascii_lowercase();
            check_name(&name)?;
            Ok((Term::Column(name), j))
        }
        _ => Err(ContextError::Unexpected(i)),
    }
}

/// The text between `quote`s starting at `i`, a doubled quote standing for one.
fn quoted(s: &str, i: usize, quote: u8) -> Result<(String, usize), ContextError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return Err(ContextError::UnterminatedString),
            Some(&c) if c == quote => {
                if b.get(j + 1) == Some(&quote) {
                    out.push(quote);
                    j += 2;
                } else {
                    // Only whole UTF-8 sequences were copied: `s` is a str and quotes are ASCII.
                    let text = String::from_utf8(out).map_err(|_| ContextError::Unexpected(i))?;
                    return Ok((text, j + 1));
                }
            }
            Some(&c) => {
                out.push(c);
                j += 1;
            }
        }
    }
}

fn check_name(name: &str) -> Result<(), ContextError> {
    if name.is_empty() {
        Err(ContextError::EmptyName)
    } else if name.len() > MAX_NAME || name.contains('\0') {
        Err(ContextError::NameTooLong)
    } else {
        Ok(())
    }
}

fn quote(text: &str, q: char) -> String {
    let doubled = format!("{q}{q}");
    format!("{q}{}{q}", text.replace(q, &doubled))
}

impl ContextExpr {
    /// The column names the expression reads, in order of first appearance.
    pub fn columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for t in &self.terms {
            if let Term::Column(c) = t {
                if !out.contains(&c.as_str()) {
                    out.push(c);
                }
            }
        }
        out
    }

    /// The form psap_encrypt stores and shows: every name quoted (`'incidents.title:' || "id"`).
    /// Parsing it gives the same expression back.
    pub fn canonical(&self) -> String {
        self.terms
            .iter()
            .map(|t| match t {
                Term::Constant(c) => quote(c, '\''),
                Term::Column(c) => quote(c, '"'),
            })
            .collect::<Vec<_>>()
            .join(" || ")
    }

    /// The SQL expression that computes the context of a row of the table named `alias` in the
    /// statement (a plain identifier): each column's text (a NULL column makes it NULL), every
    /// operator and type schema-qualified. Columns are qualified (`r."id"`): a column dropped or
    /// renamed since the expression was set fails the statement, where an unqualified name
    /// would resolve to the whole row of a table or alias of that name and bind values to it.
    /// A literal's text is the same under any setting (it holds no backslash).
    pub fn to_sql(&self, alias: &str) -> String {
        let parts: Vec<String> = self
            .terms
            .iter()
            .map(|t| match t {
                Term::Constant(c) => format!("{}::pg_catalog.text", quote(c, '\'')),
                Term::Column(c) => format!("{alias}.{}::pg_catalog.text", quote(c, '"')),
            })
            .collect();
        format!("({})", parts.join(" OPERATOR(pg_catalog.||) "))
    }
}
