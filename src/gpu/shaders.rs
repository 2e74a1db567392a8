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
    LnShift,
    DeepEmbed,
    MatmulVec,
    MatmulSparse,
    MatmulMat,
    MatmulCoop,
    Wkv7,
    Quantize,
    Argmax,
    Sample,
    Copy,
}

impl Kernel {
    pub const ALL: [Kernel; 12] = [
        Kernel::LayerNorm,
        Kernel::LnShift,
        Kernel::MatmulVec,
        Kernel::MatmulSparse,
        Kernel::MatmulMat,
        Kernel::MatmulCoop,
        Kernel::Wkv7,
        Kernel::Quantize,
        Kernel::Argmax,
        Kernel::Sample,
        Kernel::Copy,
        Kernel::DeepEmbed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::LayerNorm => "layer_norm",
            Kernel::LnShift => "ln_shift",
            Kernel::DeepEmbed => "deep_embed",
            Kernel::MatmulVec => "matmul_vec",
            Kernel::MatmulSparse => "matmul_sparse",
            Kernel::MatmulMat => "matmul_mat",
            Kernel::MatmulCoop => "matmul_coop",
            Kernel::Wkv7 => "wkv7",
            Kernel::Quantize => "quantize",
            Kernel::Argmax => "argmax",
            Kernel::Sample => "sample",
            Kernel::Copy => "copy",
        }
    }

    pub fn from_name(name: &str) -> Result<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
            Error::Invalid(format!("unknown kernel {name:?}; kernels: {:?}", Kernel::ALL.map(|k| k.name())))
        })
    }

    pub fn source(self) -> &'static str {
        match self {
            Kernel::LayerNorm => include_str!("../../shaders/layer_norm.wgsl"),
            Kernel::LnShift => include_str!("../../shaders/ln_shift.wgsl"),
            Kernel::DeepEmbed => include_str!("../../shaders/deep_embed.wgsl"),
            Kernel::MatmulVec => include_str!("../../shaders/matmul_vec.wgsl"),
            Kernel::MatmulSparse => include_str!("../../shaders/matmul_sparse.wgsl"),
            Kernel::MatmulMat => include_str!("../../shaders/matmul_mat.wgsl"),
            Kernel::MatmulCoop => include_str!("../../shaders/matmul_coop.wgsl"),
            Kernel::Wkv7 => include_str!("../../shaders/wkv7.wgsl"),
            Kernel::Quantize => include_str!("../../shaders/quantize.wgsl"),
            Kernel::Argmax => include_str!("../../shaders/argmax.wgsl"),
            Kernel::Sample => include_str!("../../shaders/sample.wgsl"),
            Kernel::Copy => include_str!("../../shaders/copy.wgsl"),
        }
    }
}

/// Files that kernels `#include`: code shared by several kernel families.
fn library(file: &str) -> Option<&'static str> {
    match file {
        "matmul_common.wgsl" => Some(include_str!("../../shaders/matmul_common.wgsl")),
        _ => None,
    }
}

/// The preprocessed source of kernel `name` under `defines` written as `NAME` or
/// `NAME=value` (for testing kernels with other compilers).
pub fn kernel_source(name: &str, defines: &[String]) -> Result<String> {
    let kernel = Kernel::from_name(name)?;
    let defines: Vec<(String, String)> = defines
        .iter()
        .map(|d| match d.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (d.clone(), String::new()),
        })
        .collect();
    preprocess(name, kernel.source(), &defines)
}

/// Expands `#include "file"` lines (files of `library`), `#ifdef` blocks and valued
/// defines. A define that the source never mentions is an error: a misspelled name would
/// otherwise silently compile the default path.
pub fn preprocess(kernel: &str, source: &str, defines: &[(String, String)]) -> Result<String> {
    let err = |message: String| Error::Shader { kernel: kernel.to_string(), message };
    let mut text = String::with_capacity(source.len());
    for (n, line) in source.lines().enumerate() {
        match line.trim_start().strip_prefix("#include ") {
            Some(rest) => {
                let file = rest.trim().trim_matches('"');
                let included =
                    library(file).ok_or_else(|| err(format!("line {}: unknown include {file:?}", n + 1)))?;
                text.push_str(included);
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    for (name, _) in defines {
        if !text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == name) {
            return Err(err(format!("define {name:?} is not used by this kernel")));
        }
    }
    expand(&text, defines).map_err(|(line, message)| err(format!("line {}: {message}", line + 1)))
}

/// `#ifdef` / `#ifndef` / `#else` / `#endif` and valued defines; errors are (line, message).
fn expand(source: &str, defines: &[(String, String)]) -> std::result::Result<String, (usize, String)> {
    let is_set = |name: &str| defines.iter().any(|(k, _)| k == name);
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
            let top = stack.last_mut().ok_or((n, "#else without #ifdef".to_string()))?;
            *top = (!top.1, true);
        } else if trimmed.starts_with("#endif") {
            stack.pop().ok_or((n, "#endif without #ifdef".to_string()))?;
        } else if trimmed.starts_with('#') {
            return Err((n, format!("unknown directive {trimmed:?}")));
        } else if active {
            out.push_str(&substitute(line, defines));
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err((source.lines().count(), "missing #endif".to_string()));
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

    #[test]
    fn includes_expand_and_unused_defines_are_errors() {
        let code = preprocess("t", "#include \"matmul_common.wgsl\"\nfn f() {}\n", &[]).unwrap();
        assert!(code.contains("struct Group") && code.ends_with("fn f() {}\n"));
        assert!(preprocess("t", "#include \"nope.wgsl\"\n", &[]).is_err());
        let e = preprocess("t", "#ifdef HAS_INT8\nx\n#endif\n", &defs(&[("HAS_IN8", "")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("HAS_IN8"), "{e}");
    }
}
