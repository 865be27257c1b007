//! Reading deploy/'s manifests as a kubelet would: string lists, and a
//! container's args with `$(VAR)` expanded from its environment.

use serde_yaml_ng::Value;

/// A YAML sequence of strings (anything else in it is skipped).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `container`'s args with every `$(NAME)` replaced from `env`.
pub fn expand_args(container: &Value, env: &[(String, String)]) -> Vec<String> {
    strings(&container["args"])
        .into_iter()
        .map(|mut arg| {
            for (name, value) in env {
                arg = arg.replace(&format!("$({name})"), value);
            }
            arg
        })
        .collect()
}
