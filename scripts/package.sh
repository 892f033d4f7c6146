#!/usr/bin/env bash
# Builds the Debian package a DBA installs without a Rust toolchain:
#   target/debian/postgresql-15-psap-encrypt_<version>_amd64.deb
# From `cargo pgrx package` (the library, the control file, the generated install script of the
# current version and every upgrade script), plus the frozen install scripts of released versions
# (sql/psap_encrypt--A.sql), psap-keys with its manual page, and the copyright of what is linked
# in (libsodium and AWS-LC are static; at run time only libc and libgcc are needed besides
# PostgreSQL). lintian must find no error and no warning; what it reports at the info and
# pedantic levels: no _FORTIFY_SOURCE in the binaries (Rust, and C built by the crates' own
# build scripts), "lib" twice in PostgreSQL's own /usr/lib/postgresql/15/lib, and spellings in
# the OpenSSL licence text quoted in the copyright file.
#   scripts/package.sh            prints the package's path
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
name=postgresql-15-psap-encrypt
# Who builds the package (a PSAP's packager sets their own).
maintainer=${PSAP_MAINTAINER:-psap_encrypt maintainers <psap-encrypt@example.org>}
out=target/debian
root=$out/root
deb=$out/${name}_${version}_amd64.deb

rm -rf "$out" && mkdir -p "$root"
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$out/pgrx" 2>&1 | grep -E "^error" || true
cargo build -q --release -p psap_keys

libdir=$($PG_CONFIG --pkglibdir)
extdir=$($PG_CONFIG --sharedir)/extension
doc=$root/usr/share/doc/$name
install -d "$root$libdir" "$root$extdir" "$root/usr/bin" "$root/usr/share/man/man1" "$doc"
install -m 644 "$out/pgrx$libdir/psap_encrypt.so" "$root$libdir/"
install -m 644 "$out/pgrx$extdir"/psap_encrypt* "$root$extdir/"
for script in sql/psap_encrypt--*.sql; do   # released install scripts and every upgrade script
    install -m 644 "$script" "$root$extdir/"
done
install -m 755 target/release/psap-keys "$root/usr/bin/"
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    "$root$libdir/psap_encrypt.so" "$root/usr/bin/psap-keys"
gzip -9n < packaging/psap-keys.1 > "$root/usr/share/man/man1/psap-keys.1.gz"

# Documentation: the copyright of everything linked in, a changelog, the DBA's pages.
{
    cat packaging/copyright.head
    echo
    echo "Files: libsodium (statically linked)"
    echo "Copyright: 2013-2026 Frank Denis <j@pureftpd.org>"
    echo "License: ISC"
    tar -xzOf "$(cargo metadata --format-version 1 | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "libsodium-sys-stable"))' | xargs dirname)/LATEST.tar.gz" \
        --wildcards '*/LICENSE' | sed -n '/Permission to use/,/SOFTWARE\./p' | sed 's/^ \* \{0,1\}//; s/^$/./; s/^/ /'
    echo
    echo "Files: AWS-LC, FIPS 140-3 module (statically linked, through aws-lc-fips-sys)"
    echo "Copyright: Amazon.com, Inc. or its affiliates; Google Inc.; The OpenSSL Project; Eric Young"
    echo "License: ISC and (Apache-2.0 or ISC) and OpenSSL"
    # Its LICENSE, with the Apache License's text replaced by Debian's copy of it.
    awk '/^Apache 2.0 license$/ { skip = 1; print "Apache 2.0 license: /usr/share/common-licenses/Apache-2.0"; print ""; next }
         /^ISC license$/ { skip = 0 } !skip' \
        "$(cargo metadata --format-version 1 | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "aws-lc-fips-sys"))' | xargs dirname)/LICENSE" \
        | sed 's/^$/./; s/^/ /'
    echo
    echo "Files: Rust crates (statically linked; the list is in rust-crates.txt)"
    echo "Copyright: their authors"
    echo "License: MIT or Apache-2.0"
    echo " Each crate is available under the MIT or the Apache-2.0 licence (some also"
    echo " under Zlib or Unlicense): see rust-crates.txt. The Apache License 2.0 is in"
    echo " /usr/share/common-licenses/Apache-2.0."
    echo
    echo "License: MIT"
    sed -n '3,$p' LICENSE | sed 's/^$/./; s/^/ /'
} > "$doc/copyright"
cargo tree -e normal,no-proc-macro --prefix none -f "{p} {l}" -p psap_encrypt -p psap_keys 2>/dev/null \
    | sed 's/ (\*)$//' | grep -v '^psap' | sort -u > "$doc/rust-crates.txt"
printf '%s (%s) unstable; urgency=medium\n\n  * Release %s: see /usr/share/doc/%s/README.md.\n\n -- %s  %s\n' \
    psap-encrypt "$version" "$version" "$name" "$maintainer" "$(date -R -d @"$(git log -1 --format=%ct)")" \
    | gzip -9n > "$doc/changelog.gz"
install -m 644 README.md docs/runbook.md docs/key-tool.md docs/compliance.md "$doc/"
gzip -9n "$doc/runbook.md"

# Control file: the run-time libraries the binaries need, as dpkg-shlibdeps computes them.
mkdir -p "$out/shlibs/debian" && printf 'Source: psap-encrypt\n\nPackage: %s\nArchitecture: amd64\n' "$name" > "$out/shlibs/debian/control"
shlibs=$(cd "$out/shlibs" && dpkg-shlibdeps -O "$OLDPWD/$root$libdir/psap_encrypt.so" "$OLDPWD/$root/usr/bin/psap-keys" 2>/dev/null \
         | sed -n 's/^shlibs:Depends=//p')
install -d "$root/DEBIAN"
sed -e "s/@VERSION@/$version/" -e "s|@MAINTAINER@|$maintainer|" -e "s/@SIZE@/$(du -sk --exclude=DEBIAN "$root" | cut -f1)/" -e "s/@SHLIBS@/$shlibs/" \
    packaging/control.in > "$root/DEBIAN/control"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
find "$root" -type d -exec chmod 755 {} +

dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
lintian --fail-on error,warning "$deb" 2> >(grep -v "root privileges is not recommended" >&2)
