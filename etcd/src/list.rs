//! Listing every key under a prefix in pages, all read at one revision.
//!
//! One unpaged range answers with every key and value in a single gRPC message, and a message
//! over the client's receive limit (4 MiB) fails, on every retry: about 8,000 heartbeats with
//! cloud-style node names. Pages of [`PAGE`] keys stay far below it; a page that is still too
//! large (values near etcd's 1.5 MiB request limit) is asked again at half the size, down to one
//! key. Every page after the first reads at the first one's revision, so the list is one
//! snapshot, as an unpaged range is; if that revision is compacted meanwhile, the list fails and
//! its caller lists again.

use etcd_client::{Client, Error, GetOptions, KeyValue};

/// Keys per page: at the 4 KiB that a heartbeat value may have, 2 MiB.
pub const PAGE: i64 = 500;

/// Every key under a prefix, at one revision.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// The store revision the list was read at.
    pub revision: i64,
    /// The cluster that answered (0 when a response had no header).
    pub cluster_id: u64,
    /// The raft term of the first page's answer.
    pub raft_term: u64,
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
}

/// The end of the range of keys that start with `prefix` (etcd's `--prefix`): the prefix with
/// its last byte below 0xff incremented and what follows it cut.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or an empty prefix): to the end of the keyspace.
    vec![0]
}

/// Whether `e` says the answer was larger than the client takes.
fn too_large(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("message length too large") || text.contains("OutOfRange")
}

/// Lists every key under `prefix` (values too, unless `keys_only`), [`PAGE`] keys at a time.
pub async fn list_prefix(
    client: &mut Client,
    prefix: &str,
    keys_only: bool,
) -> Result<Listing, Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut listing = Listing::default();
    let mut page = PAGE;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
        if keys_only {
            options = options.with_keys_only();
        }
        if listing.revision != 0 {
            options = options.with_revision(listing.revision);
        }
        let mut resp = match client.get(from.clone(), Some(options)).await {
            Ok(resp) => resp,
            Err(e) if too_large(&e) && page > 1 => {
                page /= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        if listing.revision == 0 {
            let header = resp.header();
            listing.revision = header.map_or(0, |h| h.revision());
            listing.cluster_id = header.map_or(0, |h| h.cluster_id());
            listing.raft_term = header.map_or(0, |h| h.raft_term());
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        let Some(last) = kvs.last() else {
            return Ok(listing);
        };
        // The next page starts just after this one's last key.
        from = last.key().to_vec();
        from.push(0);
        listing.kvs.extend(kvs);
        if !more {
            return Ok(listing);
        }
        page = PAGE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_range_ends_where_etcd_ends_it() {
        assert_eq!(prefix_end(b"/monitor/heartbeat/"), b"/monitor/heartbeat0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
