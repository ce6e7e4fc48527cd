# Ray image with torch (CPU) and the modelwrapper package, for the KubeRay
# examples (examples/kuberay/): head and workers run the same image, so Ray and
# Python versions match. The wheel is built from python/ in this repository;
# nothing is installed from a public index under the name modelwrapper.
#   docker build -f docker/modelwrapper-ray.Dockerfile -t ghcr.io/zerocopy-dev/modelwrapper-ray:0.1.0 .
FROM python:3.11-slim AS wheel
COPY python /src/python
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src/python

FROM rayproject/ray:2.60.0-py311
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    pip install --no-cache-dir /tmp/wheels/modelwrapper-*.whl
