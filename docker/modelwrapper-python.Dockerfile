# Python image with torch (CPU) and the modelwrapper package (built from
# python/ in this repository), for task-mode templates and other plain Python
# pods. Ray pods use modelwrapper-ray.Dockerfile, which adds it to Ray's image.
#   docker build -f docker/modelwrapper-python.Dockerfile -t ghcr.io/zerocopy-dev/modelwrapper-python:0.1.0 .
FROM python:3.11-slim
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY python /src/python
RUN pip install --no-cache-dir /src/python && rm -rf /src
ENTRYPOINT ["python3"]
