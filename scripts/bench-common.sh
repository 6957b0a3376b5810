# Shared by scripts/bench.sh and scripts/instructions.sh (sourced, not run): tool installation,
# CPU pinning, the scratch directory with its child processes, free ports, and the one-worker
# nginx configurations (the fixed-answer upstream among them).

# install_missing TOOL...: installs with apt what is not on PATH (as root, or with sudo).
install_missing() {
    local need=() pkgs=() t
    for t in "$@"; do
        command -v "$t" >/dev/null || need+=("$t")
    done
    ((${#need[@]})) || return 0
    for t in "${need[@]}"; do
        case "$t" in
            nginx) pkgs+=(nginx-light) ;;
            taskset) pkgs+=(util-linux) ;;
            callgrind_annotate | callgrind_control) pkgs+=(valgrind) ;;
            *) pkgs+=("$t") ;;
        esac
    done
    local sudo=""
    [[ $(id -u) == 0 ]] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
}

# The load generator on CPU 0, every server on CPU 1 (one tokio worker, one nginx worker).
if (($(nproc) >= 2)); then
    load="taskset -c 0"
    serve="taskset -c 1"
else
    load=""
    serve=""
fi
export TOKIO_WORKER_THREADS=1

# $tmp: the scratch directory; every child started goes into pids, killed on exit.
tmp="$(mktemp -d)"
chmod 755 "$tmp"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# nginx_conf NAME <<servers: a one-worker nginx of its own (its own process, on the servers' CPU).
nginx_conf() {
    mkdir -p "$tmp/$1"
    local servers
    servers="$(cat)"
    cat >"$tmp/$1.conf" <<NGINX
worker_processes 1;
daemon off;
pid $tmp/$1/nginx.pid;
error_log $tmp/$1/error.log warn;
events { worker_connections 4096; }
http {
    client_body_temp_path $tmp/$1/body;
    proxy_temp_path $tmp/$1/proxy;
    fastcgi_temp_path $tmp/$1/fastcgi;
    uwsgi_temp_path $tmp/$1/uwsgi;
    scgi_temp_path $tmp/$1/scgi;
    keepalive_requests 100000000;
$servers
}
NGINX
}

# The upstream tokens the fixed-answer upstream issues: this prefix, then 32 hex digits (36
# characters by default, sealed to 64 bytes; Synapse's own `syt_<localpart>_<random>_<crc>` are
# 39 and more, e.g. BENCH_TOKEN_PREFIX=syt_YWxpY2U_ for 44).
token_prefix="${BENCH_TOKEN_PREFIX:-syt_}"

# upstream_conf PORT: the fixed-answer upstream (stands in for the homeserver) on PORT, as
# nginx's config "upstream". A process of its own: were it the baseline's own worker, nginx
# would proxy to itself inside one event loop (no second process, fewer context switches) while
# the proxy always talks to another process.
upstream_conf() {
    nginx_conf upstream <<NGINX
    access_log off;
    server {
        listen 127.0.0.1:$1;
        default_type application/json;
        location / { return 200 '{"user_id":"@bench:bench","device_id":"DEV"}'; }
        location ~ /login\$ {
            # A new user per login: one user with 100k live sessions would measure the per-user
            # session index instead (index_add.lua scans it whole on every login and refresh).
            return 200 '{"user_id":"@u\$request_id:bench","device_id":"D\$request_id","access_token":"$token_prefix\$request_id"}';
        }
    }
NGINX
}

# start_nginx NAME: runs the config NAME on the servers' CPU; its pid in nginx_pid.
start_nginx() {
    $serve "$(command -v nginx || echo /usr/sbin/nginx)" -c "$tmp/$1.conf" -p "$tmp/$1" \
        2>>"$tmp/$1/stderr.log" &
    nginx_pid=$!
    pids+=($nginx_pid)
}

# The login of the benchmarks (the fixed-answer upstream answers each with a new user).
login_body='{"type":"m.login.password","identifier":{"type":"m.id.user","user":"bench"},"password":"p","refresh_token":true}'

# login_script FILE: the wrk script of /login wrapping: every request mints a new session (the
# upstream answers a fresh token).
login_script() {
    cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = '$login_body'
wrk.headers["Content-Type"] = "application/json"
LUA
}

# refresh_script FILE: the wrk script of /refresh with fresh tokens: each connection logs in
# once, then spends every refresh token exactly once (the next request uses the one the last
# answer returned), as a client does.
refresh_script() {
    cat >"$1" <<LUA
local pool = {}
logins = 0
local hdr = { ["Content-Type"] = "application/json" }
request = function()
    local rt = table.remove(pool)
    if rt then
        return wrk.format("POST", "/_matrix/client/v3/refresh", hdr, '{"refresh_token":"' .. rt .. '"}')
    end
    logins = logins + 1
    return wrk.format("POST", "/_matrix/client/v3/login", hdr, '$login_body')
end
response = function(status, headers, body)
    local rt = body:match('"refresh_token"%s*:%s*"([^"]+)"')
    if rt then pool[#pool + 1] = rt end
end
LUA
}
