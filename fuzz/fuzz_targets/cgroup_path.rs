//! cgroup path → pod, the resolver's whole decision: every path either is
//! a pod below a configured root, or is not, or is refused — and a pod's
//! own cgroup is always a prefix of the path that named it.
#![no_main]

use agent::caller::cgroup::PodLayout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let layouts = [
        PodLayout::default(),
        PodLayout::new(["kubelet.slice/kubelet-kubepods.slice", "kubelet/kubepods"]),
    ];
    for layout in &layouts {
        if let Ok(Some(pod)) = layout.pod_of_path(path) {
            let normalised: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            assert!(normalised.join("/").starts_with(&pod.pod_path));
            assert!(layout.roots().any(|r| pod.pod_path.starts_with(r)));
            assert_eq!(pod.pod_uid.len(), 36);
        }
    }
});
