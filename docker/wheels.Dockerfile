# The local wheels directory as an image, for BuildKit versions without named build contexts:
#   docker build -t resnet-serve-wheels:local -f docker/wheels.Dockerfile /opt/wheels
FROM scratch
COPY . /
