# The runtime base of the nodepulse and etcd images where no registry is reachable: a rootfs
# unpacked from Debian packages by hack/image.sh (glibc, libgcc, CA certificates, netbase), the
# same contents distroless/cc-debian12 carries.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
