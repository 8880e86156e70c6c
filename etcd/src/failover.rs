//! One etcd member at a time, and the next one when it fails: gRPC's "pick first".
//!
//! etcd-client spreads requests over every endpoint (tonic's power-of-two-choices balancer),
//! and keeps sending a share of them to a member that is down: with one member of three gone, a
//! third of all calls fail, again and again, so heartbeats and watches take several tries to come
//! back. etcd's own Go client leaves out a member whose connection failed. This channel does the
//! same with less: every request goes to the active member; a request that cannot reach it (a
//! transport error) or that it refuses as unavailable (no leader, shutting down) moves the
//! requests after it on to the next member. A member that stops answering without failing
//! (a hung process, a frozen machine) fails nothing: a client that notices (the agent, whose
//! lease keep-alives go unanswered) moves on through [`ActiveMember::move_on_from`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use etcd_client::{BalancedChannelBuilder, Channel};
use http::Uri;
use tokio::sync::{mpsc, watch};
use tonic::transport::Endpoint;
use tonic::transport::channel::Change;
use tower::{BoxError, Service, ServiceExt};

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;
type Members = Arc<Vec<(Uri, tonic::transport::Channel)>>;

/// gRPC's status code for "unavailable": etcd's "no leader" (with `require_leader`), a member
/// stopping, a connection refused.
const UNAVAILABLE: &str = "14";

/// Which member a failover channel sends to, shared with its client's user.
#[derive(Clone, Debug, Default)]
pub struct ActiveMember(Arc<AtomicUsize>);

impl ActiveMember {
    /// The member in use now, as a position that only grows (taken modulo the members).
    pub fn current(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Sends the requests from now on to the member after `seen` (a [`ActiveMember::current`]),
    /// unless they have moved on from it already: a caller whose streams sat on a member that
    /// the channel has left since must not move them once more, maybe back onto that member.
    /// Returns whether this call moved them.
    pub fn move_on_from(&self, seen: usize) -> bool {
        self.0
            .compare_exchange(
                seen,
                seen.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

/// Hands etcd-client a [`Failover`] channel in place of its balancer.
pub struct FailoverChannel(pub ActiveMember);

impl BalancedChannelBuilder for FailoverChannel {
    type Error = tonic::transport::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let (changes, mut incoming) = mpsc::channel::<Change<Uri, Endpoint>>(buffer_size);
        let (members_tx, members) = watch::channel(Members::default());
        // etcd-client sends the endpoints (built with its TLS and keep-alive options) through
        // this channel; the task ends with the client.
        tokio::spawn(async move {
            while let Some(change) = incoming.recv().await {
                members_tx.send_modify(|members| {
                    let mut next: Vec<_> = members.as_ref().clone();
                    match change {
                        Change::Insert(uri, endpoint) => {
                            next.retain(|(u, _)| *u != uri);
                            next.push((uri, endpoint.connect_lazy()));
                        }
                        Change::Remove(uri) => next.retain(|(u, _)| *u != uri),
                    }
                    *members = Arc::new(next);
                });
            }
        });
        let failover = Failover {
            members,
            active: self.0,
        };
        Ok((
            Channel::Custom(tower::util::BoxCloneSyncService::new(failover)),
            changes,
        ))
    }
}

/// Sends every request to the active member; see the module documentation.
#[derive(Clone)]
struct Failover {
    members: watch::Receiver<Members>,
    active: ActiveMember,
}

impl Service<Request> for Failover {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each request waits for its member's channel in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let mut members = self.members.clone();
        let active = self.active.clone();
        Box::pin(async move {
            let members: Members = members.wait_for(|m| !m.is_empty()).await?.clone();
            let chosen = active.current();
            let (uri, channel) = &members[chosen % members.len()];
            let result = channel.clone().oneshot(request).await;
            let unreachable = match &result {
                Err(_) => true,
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|s| s == UNAVAILABLE),
            };
            if unreachable && members.len() > 1 && active.move_on_from(chosen) {
                tracing::debug!(member = %uri, "etcd member unavailable; using the next one");
            }
            Ok(result?)
        })
    }
}
