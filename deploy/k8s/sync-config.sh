#!/usr/bin/env bash
# Copies the repository's tenants/*.yaml and policies/*.yaml (all but
# models.yaml, which is Kubernetes-specific here) into base/config/, where the
# kustomization's configMapGenerator reads them: kustomize refuses files
# outside the kustomization's folder. A new file also needs its line in
# base/kustomization.yaml. tests/deploy/test_k8s.py fails while the copies differ.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
rm -f "$here"/base/config/tenants/*.yaml
cp "$repo"/tenants/*.yaml "$here/base/config/tenants/"
for file in "$repo"/policies/*.yaml; do
    name="$(basename "$file")"
    if [ "$name" != models.yaml ]; then
        cp "$file" "$here/base/config/policies/$name"
    fi
done
echo "copied into $here/base/config; compare base/config/policies/models.yaml with policies/models.yaml by hand"
