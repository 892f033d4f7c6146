//! psap_decrypt's two entry points, written against PostgreSQL's function manager directly.
//!
//! Application views call psap_decrypt once for every row they read, so its call costs what the
//! cipher does not. pgrx's generated wrapper adds, per call, an iterator over the arguments, a
//! switch to the memory context that is already current, and a guarded call into PostgreSQL (a
//! `sigsetjmp`) to detoast even a short inline value: about 30-50 ns of a decrypting scan's 400
//! or so per row on the benchmark's machine (BENCHMARKS.md). These entry points keep what
//! matters of it, the guard that turns a Rust panic into a PostgreSQL ERROR (pgrx's
//! `pgrx_extern_c_guard`, the one its wrappers use: check this file on a pgrx upgrade), and do the
//! rest inline: an argument is detoasted (by PostgreSQL) only when it is stored compressed or out
//! of line, as `PG_GETARG_TEXT_PP` does. The ciphertext is read as bytes: the envelope parser
//! admits only ASCII (pgrx did not check a text's UTF-8 in a UTF-8 database, the only kind the
//! extension installs in), and a value passed through is returned byte for byte.
//!
//! Their symbols are the names pgrx gave these functions in 0.1.0, so the SQL declarations (below,
//! in the install script; 0.1.0's, in an updated installation) are the same.

use pgrx::pg_sys;
use pgrx::pg_sys::submodules::panic::pgrx_extern_c_guard;

use super::crypto::{self, PallocText};

static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };

/// psap_decrypt(ciphertext text) RETURNS text.
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_psap_decrypt_wrapper() -> &'static pg_sys::Pg_finfo_record {
    &V1
}

/// # Safety
/// Called by PostgreSQL's function manager for the SQL declaration below (one text argument).
#[unsafe(no_mangle)]
#[doc(hidden)]
pub unsafe extern "C-unwind" fn psap_decrypt_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fcinfo is the function manager's, for one text argument.
    unsafe { call(fcinfo, |[ciphertext]| crypto::psap_decrypt(ciphertext)) }
}

/// psap_decrypt(ciphertext text, context text) RETURNS text.
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_psap_decrypt_bound_wrapper() -> &'static pg_sys::Pg_finfo_record {
    &V1
}

/// # Safety
/// Called by PostgreSQL's function manager for the SQL declaration below (two text arguments).
#[unsafe(no_mangle)]
#[doc(hidden)]
pub unsafe extern "C-unwind" fn psap_decrypt_bound_wrapper(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fcinfo is the function manager's, for two text arguments.
    unsafe {
        call(fcinfo, |[ciphertext, context]| {
            crypto::psap_decrypt_bound(ciphertext, context)
        })
    }
}

/// Calls `f` with the bytes of the first `N` text arguments, inside pgrx's panic guard; a NULL
/// argument gives NULL (the functions are STRICT: PostgreSQL does not call them with one; nor
/// with a null pointer not marked NULL, which only a faulty C caller could pass).
///
/// # Safety
/// `fcinfo` must be the function manager's, with at least `N` arguments, all of type text.
unsafe fn call<const N: usize>(
    fcinfo: pg_sys::FunctionCallInfo,
    f: impl FnOnce([&[u8]; N]) -> PallocText,
) -> pg_sys::Datum {
    // SAFETY: as the caller promises; the slices are read within this call only.
    unsafe {
        pgrx_extern_c_guard(|| {
            let mut args: [&[u8]; N] = [&[]; N];
            for (n, arg) in args.iter_mut().enumerate() {
                let datum = pgrx::fcinfo::pg_get_nullable_datum(fcinfo, n);
                if datum.isnull || datum.value.is_null() {
                    (*fcinfo).isnull = true;
                    return pg_sys::Datum::from(0usize);
                }
                *arg = text_bytes(datum.value);
            }
            pg_sys::Datum::from(f(args).into_raw())
        })
    }
}

/// The bytes of a text datum: in place when the value is inline and uncompressed (a short
/// header or a plain four-byte one), else detoasted by PostgreSQL into the current memory
/// context (`pg_detoast_datum_packed`, as `PG_GETARG_TEXT_PP`).
///
/// # Safety
/// `datum` must be a non-null text datum that lives at least as long as the slice is used.
unsafe fn text_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: as the caller promises.
    unsafe {
        let mut p = datum.cast_mut_ptr::<pg_sys::varlena>();
        if pgrx::varlena::varatt_is_4b_c(p) || pgrx::varlena::varatt_is_1b_e(p) {
            p = pg_sys::pg_detoast_datum_packed(p);
        }
        pgrx::varlena::varlena_to_byte_slice(p)
    }
}

pgrx::extension_sql!(
    r#"
CREATE FUNCTION "psap_decrypt"(
	"ciphertext" TEXT
) RETURNS text
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'psap_decrypt_wrapper';

CREATE FUNCTION "psap_decrypt"(
	"ciphertext" TEXT,
	"context" TEXT
) RETURNS text
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'psap_decrypt_bound_wrapper';
"#,
    name = "psap_decrypt",
    requires = ["check_install"],
);
