# busybox from Debian's busybox-static (one static binary, an applet link per command): what the
# chart's etcd.volumePermissions init container runs `chown` with where no registry is reachable.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["sh"]
