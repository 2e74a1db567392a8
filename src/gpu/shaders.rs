//! The WGSL kernel sources and the small preprocessor that makes their variants.
//!
//! A variant is a list of defines. A define with an empty value is a flag tested by
//! `#ifdef NAME` / `#ifndef NAME` / `#else` / `#endif` lines; a define with a value is
//! substituted wherever its name appears as a whole word (used for sizes that WGSL needs
//! as constants, like a workgroup size). Nothing else is rewritten.

use crate::error::{Error, Result};

/// Every kernel family, one WGSL file each. This is the only place that names the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    LayerNorm,
    TokenShift,
    Matmul,
    Wkv7,
    Quantize,
    Argmax,
    Copy,
}

impl Kernel {
    pub const ALL: [Kernel; 7] = [Kernel::LayerNorm, Kernel::TokenShift, Kernel::Matmul, Kernel::Wkv7, Kernel::Quantize, Kernel::Argmax, Kernel::Copy];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::LayerNorm => "layer_norm",
            Kernel::TokenShift => "token_shift",
            Kernel::Matmul => "matmul",
            Kernel::Wkv7 => "wkv7",
            Kernel::Quantize => "quantize",
            Kernel::Argmax => "argmax",
            Kernel::Copy => "copy",
        }
    }

    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn source(self) -> &'static str {
        match self {
            Kernel::LayerNorm => include_str!("../../shaders/layer_norm.wgsl"),
            Kernel::TokenShift => include_str!("../../shaders/token_shift.wgsl"),
            Kernel::Matmul => include_str!("../../shaders/matmul.wgsl"),
            Kernel::Wkv7 => include_str!("../../shaders/wkv7.wgsl"),
            Kernel::Quantize => include_str!("../../shaders/quantize.wgsl"),
            Kernel::Argmax => include_str!("../../shaders/argmax.wgsl"),
            Kernel::Copy => include_str!("../../shaders/copy.wgsl"),
        }
    }

    /// Every variant the runtime can ask for, for validation tests.
    pub fn variants(self) -> Vec<Vec<(String, String)>> {
        let d = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match self {
            Kernel::LayerNorm => vec![vec![]],
            Kernel::TokenShift => vec![d(&[("N_MIX", "1u")]), d(&[("N_MIX", "6u")])],
            // Activations and accumulation are per-matrix uniforms, not variants.
            Kernel::Matmul => [&[][..], &["WEIGHT_BF16"], &["WEIGHT_QUANT", "WEIGHT_INT8"], &["WEIGHT_QUANT", "WEIGHT_NF4"]]
                .iter()
                .map(|flags| flags.iter().map(|f| (f.to_string(), String::new())).collect())
                .collect(),
            Kernel::Wkv7 => vec![d(&[("HEAD_SIZE", "64u")]), d(&[("HEAD_SIZE", "32u")])],
            Kernel::Quantize => vec![d(&[("INT8", "")]), d(&[("NF4", "")])],
            Kernel::Argmax | Kernel::Copy => vec![vec![]],
        }
    }
}

/// Expands `#ifdef` blocks and substitutes valued defines.
pub fn preprocess(kernel: &str, source: &str, defines: &[(String, String)]) -> Result<String> {
    let is_set = |name: &str| defines.iter().any(|(k, _)| k == name);
    let err = |line: usize, message: &str| Error::Shader {
        kernel: kernel.to_string(),
        message: format!("line {}: {message}", line + 1),
    };
    // Stack of (this branch active, some branch already taken).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let mut out = String::with_capacity(source.len());
    for (n, line) in source.lines().enumerate() {
        let trimmed = line.trim_start();
        let active = stack.iter().all(|(a, _)| *a);
        if let Some(rest) = trimmed.strip_prefix("#ifdef ").or_else(|| trimmed.strip_prefix("#ifndef ")) {
            let want = trimmed.starts_with("#ifdef ");
            let cond = is_set(rest.trim()) == want;
            stack.push((cond, cond));
        } else if trimmed.starts_with("#else") {
            let top = stack.last_mut().ok_or_else(|| err(n, "#else without #ifdef"))?;
            *top = (!top.1, true);
        } else if trimmed.starts_with("#endif") {
            stack.pop().ok_or_else(|| err(n, "#endif without #ifdef"))?;
        } else if trimmed.starts_with('#') {
            return Err(err(n, &format!("unknown directive {trimmed:?}")));
        } else if active {
            out.push_str(&substitute(line, defines));
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(err(source.lines().count(), "missing #endif"));
    }
    Ok(out)
}

fn substitute(line: &str, defines: &[(String, String)]) -> String {
    let mut result = String::with_capacity(line.len());
    let mut word = String::new();
    let flush = |word: &mut String, result: &mut String| {
        match defines.iter().find(|(k, v)| k == word && !v.is_empty()) {
            Some((_, v)) => result.push_str(v),
            None => result.push_str(word),
        }
        word.clear();
    };
    for ch in line.chars() {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            word.push(ch);
        } else {
            flush(&mut word, &mut result);
            result.push(ch);
        }
    }
    flush(&mut word, &mut result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn ifdef_else_and_values() {
        let src = "a\n#ifdef X\nb\n#else\nc\n#endif\n#ifndef X\nd\n#endif\nN+NN\n";
        assert_eq!(preprocess("t", src, &defs(&[("X", ""), ("N", "4u")])).unwrap(), "a\nb\n4u+NN\n");
        assert_eq!(preprocess("t", src, &defs(&[])).unwrap(), "a\nc\nd\nN+NN\n");
    }

    #[test]
    fn unbalanced_directives_are_errors() {
        assert!(preprocess("t", "#ifdef X\n", &[]).is_err());
        assert!(preprocess("t", "#endif\n", &[]).is_err());
        assert!(preprocess("t", "#pragma x\n", &[]).is_err());
    }

    /// Every variant of every kernel parses and validates with naga, no GPU needed.
    #[test]
    fn every_variant_validates_with_naga() {
        for kernel in Kernel::ALL {
            for variant in kernel.variants() {
                let code = preprocess(kernel.name(), kernel.source(), &variant).unwrap();
                let module = naga::front::wgsl::parse_str(&code)
                    .unwrap_or_else(|e| panic!("{} {:?}: {}", kernel.name(), variant, e.emit_to_string(&code)));
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
                    .validate(&module)
                    .unwrap_or_else(|e| panic!("{} {:?}: {:?}", kernel.name(), variant, e));
            }
        }
    }
}
