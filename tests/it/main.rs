//! Integration tests: real components built from `plugins/`, real redb
//! files, real `plexus` processes on 127.0.0.1.

mod ambassador;
mod bad_input;
mod capacity;
mod chaos;
mod circuit_breaker;
mod cluster;
mod config_golden;
mod cqrs;
mod dashboard;
mod event_store;
mod gossip_crdt;
mod http_proxy;
mod leader_election;
mod load_balancer;
mod operate;
mod process;
mod pubsub;
mod relay;
mod replicated_kv;
mod sharding;
mod strangler_fig;
mod swap;
mod task_worker;
mod trust;
mod work_queue;
