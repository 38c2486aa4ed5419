#!/usr/bin/env bash
# Builds the fn-image-resolver container image without a Docker daemon and
# pushes it:
#
#   scripts/build-image.sh REF            e.g. ghcr.io/you/fn-image-resolver:dev
#   scripts/build-image.sh --insecure REF  REF's registry speaks plain HTTP
#
# The image holds the release binary and exactly the runtime files it needs,
# taken from Debian packages: the C library and the dynamic loader (libc6),
# libgcc_s (libgcc-s1) and the CA bundle (ca-certificates). No shell, no
# package manager. It runs as user 65532 with the Dockerfile's entrypoint,
# command and environment (a test checks that both describe the same image),
# and carries the OCI labels source, revision and version.
#
# Pushing uses crane (go-containerregistry, pinned, tests/crane/build.sh) and
# its credentials: `crane auth login REGISTRY -u USER -p PASS` or a Docker
# config (~/.docker/config.json, $DOCKER_CONFIG).
#
# Without a route out (e.g. through the test cluster's $CLUSTER_EXEC), fill
# the caches once where there is one:
#
#   cargo fetch --locked            # crates, into ~/.cargo
#   scripts/build-image.sh --fetch  # the Debian packages and crane, into
#                                   # ~/.cache/fn-image-resolver/image
#
# and the build uses only them.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${FNIR_IMAGE_CACHE:-$HOME/.cache/fn-image-resolver/image}
packages=(libc6 libgcc-s1 ca-certificates)
# What the image runs; the Dockerfile says the same (tests/it/node.rs checks).
binary_path=/usr/local/bin/fn-image-resolver
user=65532:65532
entrypoint=$binary_path
cmd=serve
env=(PATH=/usr/local/bin:/usr/bin:/bin MIMALLOC_ARENA_EAGER_COMMIT=0)

log() { echo "build-image.sh: $*" >&2; }
usage() {
    echo "usage: $0 [--insecure] REF | --fetch" >&2
    exit 2
}

insecure=()
fetch_only=0
ref=""
while [ $# -gt 0 ]; do
    case $1 in
    --insecure) insecure=(--insecure) ;;
    --fetch) fetch_only=1 ;;
    -h | --help) usage ;;
    -*) usage ;;
    *) [ -z "$ref" ] || usage; ref=$1 ;;
    esac
    shift
done
[ "$fetch_only" = 1 ] || [ -n "$ref" ] || usage

# The Debian packages, at the versions this machine has installed, kept in
# the cache so that a build without a route out finds them.
debs=()
fetch_debs() {
    mkdir -p "$cache/debs"
    local p version arch file
    for p in "${packages[@]}"; do
        version=$(dpkg-query -W -f '${Version}' "$p" 2>/dev/null) ||
            { log "$p is not installed here; install it (apt-get install $p)"; exit 1; }
        arch=$(dpkg-query -W -f '${Architecture}' "$p")
        # apt-get download's own file name.
        file=$cache/debs/${p}_${version//:/%3a}_${arch}.deb
        if [ ! -s "$file" ]; then
            log "downloading $p $version"
            # (As root, apt warns that it downloads unsandboxed: not news.)
            (cd "$cache/debs" && apt-get download -q "$p=$version" >/dev/null 2>"$cache/apt.log") || {
                cat "$cache/apt.log" >&2
                log "cannot download $p $version (no route out? run '$0 --fetch' where there is one)"
                exit 1
            }
            [ -s "$file" ] || { log "apt-get download left no $file"; exit 1; }
        fi
        debs+=("$file")
    done
}
fetch_debs
crane=$("$repo/tests/crane/build.sh" | tail -n 1)
if [ "$fetch_only" = 1 ]; then
    log "caches filled: $cache/debs, $crane"
    exit 0
fi

# The release binary. Offline first: with the crates already fetched, no
# network is needed (nor tried); otherwise cargo fetches them.
cd "$repo"
log "building the release binary"
cargo build --release --locked --offline --bin fn-image-resolver 2>/dev/null ||
    cargo build --release --locked --bin fn-image-resolver
binary=$repo/target/release/fn-image-resolver

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for deb in "${debs[@]}"; do
    dpkg-deb -x "$deb" "$work/debs"
done
rootfs=$work/rootfs
mkdir -p "$rootfs$(dirname "$binary_path")"
install -m 0755 "$binary" "$rootfs$binary_path"
strip "$rootfs$binary_path"

# Exactly the shared objects the binary loads: its interpreter and its
# NEEDED entries, found in the packages' library directory (Debian 12 keeps
# them under /usr/lib with /lib a symlink to it; the loader's own path
# /lib64/ld-linux-x86-64.so.2 is a symlink too).
copy_from_debs() { # absolute path in the image
    local path=$1 found=""
    for candidate in "$work/debs$path" "$work/debs/usr$path"; do
        if [ -e "$candidate" ]; then
            found=$(readlink -f "$candidate")
            break
        fi
    done
    [ -n "$found" ] || { log "$path is in none of: ${packages[*]}"; exit 1; }
    mkdir -p "$rootfs$(dirname "$path")"
    install -m 0755 "$found" "$rootfs$path"
}
interpreter=$(readelf -l "$binary" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
[ -n "$interpreter" ] || { log "cannot read the binary's interpreter"; exit 1; }
copy_from_debs "$interpreter"
libdir=/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
for lib in $(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    copy_from_debs "$libdir/$lib"
done
# The CA bundle as update-ca-certificates makes it at install time (the
# package ships the certificates one a file, not the bundle).
mkdir -p "$rootfs/etc/ssl/certs"
cat "$work"/debs/usr/share/ca-certificates/mozilla/*.crt >"$rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$rootfs/etc/ssl/certs/ca-certificates.crt"

# One layer, reproducible: sorted, owned by root, timestamps from the commit.
epoch=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
    -C "$rootfs" -cf - . | gzip -n >"$work/layer.tar.gz"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)
source=$(sed -n 's/^repository = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ] || revision="$revision-dirty"
env_flags=()
for e in "${env[@]}"; do env_flags+=(--env "$e"); done

log "pushing $ref"
"$crane" append "${insecure[@]}" --oci-empty-base -f "$work/layer.tar.gz" -t "$ref" >/dev/null 2>"$work/crane.log" ||
    { cat "$work/crane.log" >&2; exit 1; }
digest_ref=$("$crane" mutate "${insecure[@]}" "$ref" -t "$ref" \
    --set-platform linux/amd64 --user "$user" \
    --entrypoint "$entrypoint" --cmd "$cmd" "${env_flags[@]}" \
    --label "org.opencontainers.image.source=$source" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.title=fn-image-resolver" \
    --label "org.opencontainers.image.licenses=Apache-2.0" 2>"$work/crane.log") ||
    { cat "$work/crane.log" >&2; exit 1; }
pinned="$ref@${digest_ref##*@}"
log "pushed $pinned ($(du -k "$work/layer.tar.gz" | cut -f1) KiB compressed)"
# The pinned reference on stdout, for a kustomization's `images:` entry.
echo "$pinned"
