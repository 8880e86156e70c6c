# etcd and etcdctl as hack/tools.sh builds them, laid out like the official image the chart names
# (quay.io/coreos/etcd): binaries in /usr/local/bin, so `kubectl exec etcd-0 -- etcdctl ...` works.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY etcd etcdctl /usr/local/bin/
WORKDIR /var/lib/etcd
EXPOSE 2379 2380
CMD ["/usr/local/bin/etcd"]
