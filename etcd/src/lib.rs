//! How nodepulse talks to etcd: the connection every binary makes ([`EtcdArgs`]: flags, TLS,
//! keep-alive), one member at a time with failover ([`failover`]), and the one list-and-watch
//! of keys that the agent, the controller and `nodepulsectl` all follow ([`watch`]), listed in
//! pages ([`list`]). What the
//! keys and values mean is `nodepulse-crd`'s `wire`; this crate only moves them.
#![deny(missing_docs)]

pub mod connect;
pub mod failover;
pub mod list;
pub mod watch;

pub use connect::{ConnectError, EtcdArgs, KEEP_ALIVE, KEEP_ALIVE_TIMEOUT};
pub use list::{Listing, list_prefix};
