//! Test harness: network namespaces, cgroups laid out like kubelet's, and
//! "pod" processes that live in them. Everything it creates carries a unique
//! name and is removed on drop, also when a test fails.

pub mod agent_bin;
pub mod agent_proc;
pub mod caps;
pub mod cgroups;
pub mod cluster;
pub mod fake_eks_auth;
pub mod foreign_bpf;
pub mod http;
pub mod imds;
pub mod manifest;
pub mod names;
pub mod netns;
pub mod pod;
pub mod podman;
pub mod privilege;
pub mod probe_server;
pub mod served;
pub mod tempdir;
pub mod tokens;
pub mod topology;
pub mod wait;
