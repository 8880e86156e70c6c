//! One etcd list-and-watch for every loop that follows keys: the agent's config key, the
//! controller's heartbeat prefix and config keys, and `nodepulsectl watch`.
//!
//! Shaped like kube-runtime's `watcher`: [`EtcdWatcher::next`] yields [`WatchEvent`]s, a
//! [`WatchEvent::Listed`] snapshot first (list at revision R, then watch from R + 1 with progress
//! notifications and previous values), then one [`WatchEvent::Put`] / [`WatchEvent::Delete`]
//! per change. It never gives up: when etcd goes away it retries with capped, jittered backoff
//! and resumes from the last revision it delivered; it lists again (a new `Listed`) when that
//! revision was compacted, when etcd cancels the watch, and when etcd is not the store the
//! revisions came from (another cluster id, or a revision gone back: a rebuilt etcd, or one
//! restored from a backup, would otherwise accept the watch from a future revision and deliver
//! nothing until its own revision caught up). It logs one line when an outage starts and one
//! when it ends.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchResponse, WatchStream};
use nodepulse_runtime::Backoff;
use tracing::{debug, info, warn};

use crate::list::list_prefix;

/// A key and its value as etcd holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in a keys-only list).
    pub value: Vec<u8>,
    /// The revision of the key's last change.
    pub mod_revision: i64,
    /// The revision at which the key was created (kept across rewrites; new after a delete).
    pub create_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

impl From<&etcd_client::KeyValue> for Kv {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Kv {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            lease: kv.lease(),
        }
    }
}

/// What the watched keys did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Every key present at `revision`: a key absent from it is absent. Sent first, and again
    /// after every re-list; the watch behind it is already in place.
    Listed {
        /// The store revision of the list.
        revision: i64,
        /// The keys and their values.
        kvs: Vec<Kv>,
        /// The store is not the one the revisions seen before came from (its cluster id changed,
        /// or its revision went back: etcd rebuilt, or restored from a backup). A key absent
        /// from it may just not have been written again yet. `false` on the first list.
        replaced: bool,
    },
    /// A key was created or changed.
    Put(Kv),
    /// A key was deleted (by hand, or its lease expired or was revoked).
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The value just before the delete, when etcd still had it.
        prev: Option<Kv>,
        /// The revision of the delete.
        revision: i64,
    },
    /// The watch broke (etcd away, connection lost); sent once per outage, when it starts.
    /// Nothing is missed: the next events resume where it broke, or a `Listed` follows.
    Interrupted,
}

/// How an [`EtcdWatcher`] watches.
#[derive(Clone, Debug)]
pub struct WatcherSettings {
    /// Names the watch in log lines: `config watch`, `heartbeat watch`.
    pub what: &'static str,
    /// Watch every key under the key (a prefix), not the key alone.
    pub prefix: bool,
    /// List keys without their values (the handler only needs to know something changed).
    pub keys_only: bool,
    /// List again after every break instead of resuming from the last revision: for a handler
    /// that trusts a fresh list more than its memory of the events.
    pub relist_after_break: bool,
    /// The retry backoff.
    pub backoff: Backoff,
    /// How long a list, or the creation of a watch, may take before the connection counts as gone.
    pub call_timeout: Duration,
}

impl WatcherSettings {
    /// A prefix watch resuming after breaks, retrying at most every 2.5 s.
    pub fn prefix(what: &'static str) -> Self {
        WatcherSettings {
            what,
            prefix: true,
            keys_only: false,
            relist_after_break: false,
            // At most 2.5 s between retries: a watch must be back within 5 s of etcd's return,
            // and a retry is due at most one cap after the last failure.
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_millis(2500)),
            call_timeout: Duration::from_secs(5),
        }
    }

    /// A watch of one key, resuming after breaks.
    pub fn key(what: &'static str) -> Self {
        WatcherSettings {
            prefix: false,
            ..WatcherSettings::prefix(what)
        }
    }
}

/// What a watch response says about the watch, before its events are looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A good response: deliver its events.
    Deliver,
    /// The revision to resume from was compacted away (`oldest` is the oldest etcd keeps).
    Compacted {
        /// The compaction revision etcd reported.
        oldest: i64,
    },
    /// etcd canceled the watch (a revoked permission, a forgotten auth token, no leader).
    Canceled {
        /// etcd's reason.
        reason: String,
    },
    /// The response comes from another etcd cluster than the revisions we hold.
    OtherCluster {
        /// The cluster id we listed from.
        was: u64,
        /// The cluster id answering now.
        now: u64,
    },
    /// etcd's revision is below one we have already seen: the store was rebuilt or restored.
    RevisionWentBack {
        /// The highest revision we saw.
        seen: i64,
        /// etcd's revision now.
        now: i64,
    },
}

/// The parts of a watch response [`judge`] looks at.
#[derive(Clone, Debug, Default)]
pub struct ResponseFacts {
    /// The watch was canceled.
    pub canceled: bool,
    /// Set when the start revision was compacted.
    pub compact_revision: i64,
    /// Why etcd canceled the watch.
    pub cancel_reason: String,
    /// The header's cluster id (0 when absent).
    pub cluster_id: u64,
    /// The header's revision (0 when absent).
    pub revision: i64,
}

impl ResponseFacts {
    /// The facts of one response.
    pub fn of(resp: &WatchResponse) -> Self {
        ResponseFacts {
            canceled: resp.canceled(),
            compact_revision: resp.compact_revision(),
            cancel_reason: resp.cancel_reason().to_string(),
            cluster_id: resp.header().map_or(0, |h| h.cluster_id()),
            revision: resp.header().map_or(0, |h| h.revision()),
        }
    }
}

/// Decides whether a response can be trusted, given the highest revision seen and the cluster
/// id listed from (0: not known yet). Compaction is checked first: etcd's compaction notice
/// carries no useful header.
pub fn judge(facts: &ResponseFacts, seen: i64, cluster_id: u64) -> Verdict {
    if facts.compact_revision > 0 {
        return Verdict::Compacted {
            oldest: facts.compact_revision,
        };
    }
    if facts.canceled {
        return Verdict::Canceled {
            reason: facts.cancel_reason.clone(),
        };
    }
    if cluster_id != 0 && facts.cluster_id != 0 && facts.cluster_id != cluster_id {
        return Verdict::OtherCluster {
            was: cluster_id,
            now: facts.cluster_id,
        };
    }
    // A store's revision never goes back. Resuming at ours on a smaller one would silently
    // skip everything until the new store catches up.
    if facts.revision > 0 && facts.revision < seen {
        return Verdict::RevisionWentBack {
            seen,
            now: facts.revision,
        };
    }
    Verdict::Deliver
}

/// Why one attempt failed (etcd away, a stream broken, a call timed out).
#[derive(Debug)]
struct Failure(String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lists and watches one key or prefix, forever. See the module documentation.
pub struct EtcdWatcher {
    client: Client,
    key: String,
    settings: WatcherSettings,
    stream: Option<WatchStream>,
    /// The next step must be a list (first, or after a compaction, cancel, rebuilt etcd).
    must_list: bool,
    /// The highest revision delivered (list revision, event or progress notification).
    revision: i64,
    /// The cluster id the revisions belong to (0 until the first list).
    cluster_id: u64,
    /// When the current outage began, if one is going on.
    outage: Option<Instant>,
    /// A re-list after a cancel waits a backoff first, in case etcd keeps canceling.
    pause_before_list: bool,
    /// The last attempt failed: wait a backoff before the next one.
    backoff_due: bool,
    pending: VecDeque<WatchEvent>,
}

impl EtcdWatcher {
    /// A watcher of `key` (a prefix when `settings.prefix`); nothing happens until
    /// [`EtcdWatcher::next`] is called.
    pub fn new(client: Client, key: impl Into<String>, settings: WatcherSettings) -> Self {
        EtcdWatcher {
            client,
            key: key.into(),
            settings,
            stream: None,
            must_list: true,
            revision: 0,
            cluster_id: 0,
            outage: None,
            pause_before_list: false,
            backoff_due: false,
            pending: VecDeque::new(),
        }
    }

    /// The key or prefix watched.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The highest revision delivered so far.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Lists the keys again before the next event: for a handler that could not take in the
    /// events so far (the controller when it cannot look up a key's lease).
    pub fn relist(&mut self) {
        self.stream = None;
        self.must_list = true;
        self.backoff_due = true;
    }

    /// The next event. Waits out etcd's absence; never fails.
    pub async fn next(&mut self) -> WatchEvent {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            if std::mem::take(&mut self.backoff_due) {
                self.settings.backoff.wait().await;
            }
            if let Err(failure) = self.step().await {
                self.stream = None;
                if self.settings.relist_after_break {
                    self.must_list = true;
                }
                let interrupted = self.outage.is_none();
                if interrupted {
                    self.outage = Some(Instant::now());
                    let then = if self.must_list {
                        format!("listing {} again", self.key)
                    } else {
                        format!("resuming from revision {}", self.revision + 1)
                    };
                    warn!(
                        "{} interrupted ({}): {failure}; retrying with backoff, then {then}",
                        self.settings.what, self.key
                    );
                } else {
                    debug!("{} ({}): {failure}; retrying", self.settings.what, self.key);
                }
                self.backoff_due = true;
                if interrupted {
                    return WatchEvent::Interrupted;
                }
            }
        }
    }

    /// One step: list and start the watch, resume the watch, or take one response.
    async fn step(&mut self) -> Result<(), Failure> {
        if self.stream.is_none() {
            if self.must_list {
                if std::mem::take(&mut self.pause_before_list) {
                    self.settings.backoff.wait().await;
                }
                return self.list_and_watch().await;
            }
            return self.resume().await;
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Err(Failure("stream closed by etcd".into())),
            Err(e) => {
                return Err(Failure(format!(
                    "lost after revision {}: {e}",
                    self.revision
                )));
            }
        };
        let facts = ResponseFacts::of(&resp);
        match judge(&facts, self.revision, self.cluster_id) {
            Verdict::Deliver => {}
            other => {
                self.relist_because(other).await;
                return Ok(());
            }
        }
        if resp.events().is_empty() {
            // A progress notification: everything up to the header's revision was sent, so a
            // resume after a long outage does not start from a revision compacted long ago.
            if !resp.created() && facts.revision > self.revision {
                self.revision = facts.revision;
            }
            return Ok(());
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            self.revision = self.revision.max(kv.mod_revision());
            self.pending.push_back(match event.event_type() {
                EventType::Put => WatchEvent::Put(kv.into()),
                EventType::Delete => WatchEvent::Delete {
                    key: kv.key().to_vec(),
                    prev: event.prev_kv().map(Kv::from),
                    revision: kv.mod_revision(),
                },
            });
        }
        Ok(())
    }

    /// Lists the keys, then starts the watch from the next revision; the `Listed` event goes
    /// out only once the watch is in place.
    async fn list_and_watch(&mut self) -> Result<(), Failure> {
        let list = async {
            if self.settings.prefix {
                let listing =
                    list_prefix(&mut self.client, &self.key, self.settings.keys_only).await?;
                Ok((listing.revision, listing.cluster_id, listing.kvs))
            } else {
                let mut options = GetOptions::new();
                if self.settings.keys_only {
                    options = options.with_keys_only();
                }
                let mut resp = self.client.get(self.key.as_str(), Some(options)).await?;
                let header = resp.header();
                let (revision, cluster_id) = (
                    header.map_or(0, |h| h.revision()),
                    header.map_or(0, |h| h.cluster_id()),
                );
                Ok::<_, etcd_client::Error>((revision, cluster_id, resp.take_kvs()))
            }
        };
        let (revision, cluster_id, listed) = tokio::time::timeout(self.settings.call_timeout, list)
            .await
            .map_err(|_| {
                Failure(format!(
                    "list {} timed out after {:?}",
                    self.key, self.settings.call_timeout
                ))
            })?
            .map_err(|e| Failure(format!("list {}: {e}", self.key)))?;
        let kvs: Vec<Kv> = listed.iter().map(Kv::from).collect();
        let (stream, _) = self.open(revision + 1, revision, cluster_id).await?;
        let other_cluster =
            self.cluster_id != 0 && cluster_id != 0 && cluster_id != self.cluster_id;
        let replaced = other_cluster || revision < self.revision;
        self.stream = Some(stream);
        self.must_list = false;
        self.revision = revision;
        self.cluster_id = cluster_id;
        self.recovered(format!("listed at revision {revision}"));
        self.pending.push_back(WatchEvent::Listed {
            revision,
            kvs,
            replaced,
        });
        Ok(())
    }

    /// Starts the watch again from the revision after the last one delivered.
    async fn resume(&mut self) -> Result<(), Failure> {
        let from = self.revision + 1;
        match self.open(from, self.revision, self.cluster_id).await? {
            (stream, Verdict::Deliver) => {
                self.stream = Some(stream);
                self.recovered(format!("resumed from revision {from}"));
            }
            (_, verdict) => self.relist_because(verdict).await,
        }
        Ok(())
    }

    /// Opens a watch from `from` and waits for etcd to confirm it; the confirmation's header
    /// tells whether this is still the etcd our revisions came from.
    async fn open(
        &mut self,
        from: i64,
        seen: i64,
        cluster_id: u64,
    ) -> Result<(WatchStream, Verdict), Failure> {
        let mut options = WatchOptions::new()
            .with_start_revision(from)
            .with_progress_notify()
            .with_prev_key();
        if self.settings.prefix {
            options = options.with_prefix();
        }
        let what = format!("watch {} from revision {from}", self.key);
        let timeout = self.settings.call_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let mut stream = self
                .client
                .watch(self.key.as_str(), Some(options))
                .await
                .map_err(|e| Failure(format!("{what}: {e}")))?;
            match stream.message().await {
                Ok(Some(resp)) => Ok((stream, resp)),
                Ok(None) => Err(Failure(format!("{what}: stream closed by etcd"))),
                Err(e) => Err(Failure(format!("{what}: {e}"))),
            }
        })
        .await
        .map_err(|_| Failure(format!("{what} timed out after {timeout:?}")))??;
        let (stream, resp) = opened;
        let verdict = judge(&ResponseFacts::of(&resp), seen, cluster_id);
        if let Verdict::Canceled { reason } = &verdict
            && self.must_list
        {
            // Refused while listing afresh (a member without a leader, a permission): a failure
            // to retry with backoff, not a reason to list again at once.
            return Err(Failure(format!("{what}: canceled by etcd ({reason})")));
        }
        Ok((stream, verdict))
    }

    /// Logs why the watch cannot go on from where it was, and makes the next step a list.
    async fn relist_because(&mut self, verdict: Verdict) {
        let (what, key) = (self.settings.what, &self.key);
        match &verdict {
            Verdict::Deliver => return,
            Verdict::Compacted { oldest } => info!(
                "{what}: revision {} was compacted: listing {key} again (etcd keeps history from revision {oldest})",
                self.revision + 1
            ),
            Verdict::Canceled { reason } => {
                warn!("{what} ({key}) canceled by etcd: {reason}; listing it again");
                // etcd checks a watch's permission inside the stream: a token a restarted etcd
                // forgot cancels it instead of failing the call, so the client's automatic
                // re-authentication never fires. Without credentials this is a no-op.
                if let Err(e) = self.client.refresh_token().await {
                    debug!("{what}: re-authenticate to etcd: {e}");
                }
                self.pause_before_list = true;
            }
            Verdict::OtherCluster { was, now } => warn!(
                "{what}: etcd's cluster id changed from {was:x} to {now:x} (rebuilt or replaced): listing {key} again"
            ),
            Verdict::RevisionWentBack { seen, now } => warn!(
                "{what}: etcd's revision went back from {seen} to {now} (rebuilt or restored from a backup): listing {key} again"
            ),
        }
        self.stream = None;
        self.must_list = true;
    }

    /// Ends the outage, if one was going on, with its one log line.
    fn recovered(&mut self, how: String) {
        self.settings.backoff.reset();
        if let Some(since) = self.outage.take() {
            info!(
                "{} ({}) back after {:.1}s: {how}",
                self.settings.what,
                self.key,
                since.elapsed().as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(revision: i64, cluster_id: u64) -> ResponseFacts {
        ResponseFacts {
            cluster_id,
            revision,
            ..Default::default()
        }
    }

    #[test]
    fn a_normal_response_is_delivered() {
        assert_eq!(judge(&facts(42, 7), 40, 7), Verdict::Deliver);
        // Nothing new since our revision: the header says exactly our revision.
        assert_eq!(judge(&facts(40, 7), 40, 7), Verdict::Deliver);
        // Before the first list nothing is known to compare with.
        assert_eq!(judge(&facts(3, 9), 0, 0), Verdict::Deliver);
    }

    #[test]
    fn a_compacted_start_revision_means_a_relist_even_without_a_header() {
        let f = ResponseFacts {
            canceled: true,
            compact_revision: 30,
            ..Default::default()
        };
        assert_eq!(judge(&f, 20, 7), Verdict::Compacted { oldest: 30 });
    }

    #[test]
    fn a_canceled_watch_means_a_relist() {
        let f = ResponseFacts {
            canceled: true,
            cancel_reason: "etcdserver: no leader".into(),
            ..facts(50, 7)
        };
        assert_eq!(
            judge(&f, 40, 7),
            Verdict::Canceled {
                reason: "etcdserver: no leader".into()
            }
        );
    }

    #[test]
    fn a_revision_gone_back_means_a_rebuilt_etcd() {
        // etcd rebuilt from scratch: it accepts our watch from revision 41 and would wait.
        assert_eq!(
            judge(&facts(3, 7), 40, 7),
            Verdict::RevisionWentBack { seen: 40, now: 3 }
        );
    }

    #[test]
    fn another_cluster_id_means_a_relist() {
        assert_eq!(
            judge(&facts(90, 8), 40, 7),
            Verdict::OtherCluster { was: 7, now: 8 }
        );
    }
}
