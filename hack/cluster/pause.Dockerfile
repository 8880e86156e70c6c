# The pod sandbox ("pause") image, as Kubernetes' build/pause makes it: one static binary.
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
