# Shared by scripts/dev, scripts/test and .ci/run. Source it; do not run it.
# Everything here works as root on a fresh Debian 12 machine and as a
# normal user on a machine that already has the packages.

set -eu

PARLEY_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=/usr/lib/postgresql/15/bin
PYTHON=/usr/bin/python3

# Debian packages the build, the server and the tests use.
PARLEY_PACKAGES="kore make gcc libc6-dev dpkg-dev libssl-dev libpq-dev
libyajl-dev libjwt-dev postgresql postgresql-client python3 python3-pytest
python3-websocket python3-psycopg2 python3-jwt python3-requests
python3-cryptography ca-certificates curl procps"

log() {
	printf '==> %s\n' "$*" >&2
}

# Install whatever is missing; apt only runs when something is.
install_deps() {
	local missing="" pkg
	for pkg in $PARLEY_PACKAGES $*; do
		dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null |
		    grep -q "install ok installed" || missing="$missing $pkg"
	done
	[ -z "$missing" ] && return 0
	log "installing:$missing"
	local sudo=""
	[ "$(id -u)" -ne 0 ] && sudo=sudo
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
	    --no-install-recommends $missing >/dev/null
}

# kodev names the app after the directory and wants conf/<name>.conf;
# a git-ignored link lets a clone of any name build (KORE-NOTES 1).
ensure_conf_link() {
	local name
	name=$(basename "$PARLEY_ROOT")
	if [ "$name" != parley ] && [ ! -e "$PARLEY_ROOT/conf/$name.conf" ]; then
		ln -s parley.conf "$PARLEY_ROOT/conf/$name.conf"
	fi
	# kodev run leaves the binary as ./<name>: keep it out of git status.
	if [ -d "$PARLEY_ROOT/.git" ] &&
	    ! grep -qx "/$name" "$PARLEY_ROOT/.git/info/exclude" 2>/dev/null; then
		mkdir -p "$PARLEY_ROOT/.git/info"
		echo "/$name" >> "$PARLEY_ROOT/.git/info/exclude"
	fi
}

# Build build/<flavor>/parley. Kore does not rebuild objects when only a
# header changed, so a newer header clears this flavor's objects.
build() {
	local flavor=${1:-dev} name objdir out
	name=$(basename "$PARLEY_ROOT")
	objdir=".objs/$flavor"
	out="build/$flavor"
	ensure_conf_link
	cd "$PARLEY_ROOT"
	mkdir -p "$objdir" "$out"
	if [ -e "$out/parley" ] && [ -n "$(find src -name '*.h' -newer "$out/parley")" ]; then
		rm -f "$objdir"/*.c.o
	fi
	log "building ($flavor)"
	KORE_BUILD_FLAVOR=$flavor KORE_OBJDIR="$objdir" KODEV_OUTPUT="$out" \
	    kodev build >"$out/build.log" 2>&1 || { cat "$out/build.log"; return 1; }
	if grep -q "warning:" "$out/build.log"; then
		cat "$out/build.log"
		log "build has warnings"
		return 1
	fi
	[ "$name" = parley ] || mv -f "$out/$name" "$out/parley"
	echo "$PARLEY_ROOT/$out/parley"
}

# Run a PostgreSQL command as a user the server accepts (not root).
as_pg() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# Start (or reuse) a project-local cluster in $1 on port $2 and create the
# database parley. It lives outside the clone so the postgres user can
# reach it whatever the clone's permissions.
pg_start() {
	local dir=$1 port=$2
	if [ ! -s "$dir/data/PG_VERSION" ]; then
		mkdir -p "$dir"
		[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir"
		as_pg "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres \
		    -E UTF8 --locale=C.UTF-8 >/dev/null
	fi
	if ! as_pg "$PG_BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
		as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
		    -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
	fi
	as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc \
	    "SELECT 1 FROM pg_database WHERE datname = 'parley'" | grep -q 1 ||
	    as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U postgres parley
}
