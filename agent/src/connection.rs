//! The agent's one etcd connection, shared by the heartbeat and the config watch.
//!
//! One HTTP/2 connection rather than one per job: etcd holds one connection per node, not two,
//! and the quiet config watch rides on the connection the lease keep-alives use. Their answers
//! (every TTL/3) show the connection alive, so at the default TTL the HTTP/2 pings that detect a
//! dead etcd never have to go out; a watch on a connection of its own needs them every 10 s.

use std::sync::Arc;

use etcd_client::Client;
use nodepulse_etcd::EtcdArgs;
use nodepulse_etcd::failover::ActiveMember;
use tokio::sync::OnceCell;

/// Connects on first use, retrying until etcd answers; every job gets a clone of the same client.
#[derive(Clone)]
pub struct EtcdConnection {
    args: EtcdArgs,
    client: Arc<OnceCell<Client>>,
    member: ActiveMember,
}

impl EtcdConnection {
    /// A connection to the etcd `args` name, made when a job first asks for it.
    pub fn new(args: EtcdArgs) -> Self {
        EtcdConnection {
            args,
            client: Arc::default(),
            member: ActiveMember::default(),
        }
    }

    /// The client; the first caller connects (and warns once while etcd refuses), the others
    /// wait for that connection.
    pub async fn client(&self) -> Client {
        self.client
            .get_or_init(|| self.args.connect_retrying_to("etcd", &self.member))
            .await
            .clone()
    }

    /// The etcd member requests go to now, to name it in [`EtcdConnection::leave_member`];
    /// `None` when there is no other member to go to.
    pub fn member_in_use(&self) -> Option<usize> {
        (self.args.endpoints.len() > 1).then(|| self.member.current())
    }

    /// Sends the requests from now on to the member after `member`, which stopped answering
    /// without failing a request (a hung member fails none, and its connection stays open until
    /// an HTTP/2 ping times out, 15 s later); nothing if the channel has left it already.
    pub fn leave_member(&self, member: usize) {
        self.member.move_on_from(member);
    }
}
