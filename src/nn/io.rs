//! safetensors files: parameters under their module-tree names with PyTorch shapes, f32
//! little-endian, and a JSON model config in the metadata (`config`), so a file describes the
//! model completely. Loading checks every name and shape against the model it fills.

use std::collections::HashMap;

use anyhow::{anyhow, bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::{Dev, HasParams, Param};

/// Serialises `params` (in visiting order; safetensors sorts by name) with `metadata`.
pub fn save(params: &[&Param], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.shape.clone(),
                p.value
                    .as_vec()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    let mut names = std::collections::BTreeSet::new();
    for (name, _, _) in &bytes {
        ensure!(
            names.insert(name.clone()),
            "two parameters are both named {name}"
        );
    }
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(name, shape, data)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    canonical_header(&safetensors::serialize(views, &Some(metadata))?)
}

/// Rewrites a safetensors header with sorted keys. The crate writes its metadata from a
/// `HashMap`, whose order changes from run to run: without this, equal weights would not be
/// equal bytes (and the same stage key would not give the same output).
fn canonical_header(bytes: &[u8]) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    // serde_json's default map is sorted, so parsing and printing again sorts every level.
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let mut text = serde_json::to_string(&header)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// The metadata of a safetensors file.
pub fn metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes).context("not a safetensors file")?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Fills every parameter and buffer of `model` from `bytes`, checking names, shapes, dtypes.
pub fn load_into(dev: &Dev, model: &mut impl HasParams, bytes: &[u8]) -> Result<()> {
    let tensors = SafeTensors::deserialize(bytes).context("not a safetensors file")?;
    let mut error = None;
    let mut seen = 0;
    let mut fill = |p: &mut Param| {
        if error.is_some() {
            return;
        }
        let result = (|| {
            let view = tensors
                .tensor(&p.name)
                .map_err(|_| anyhow!("the file has no tensor {}", p.name))?;
            ensure!(
                view.dtype() == Dtype::F32,
                "{} is {:?}, expected F32",
                p.name,
                view.dtype()
            );
            ensure!(
                view.shape() == p.shape.as_slice(),
                "{} has shape {:?}, the model expects {:?}",
                p.name,
                view.shape(),
                p.shape
            );
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            *p = Param::new(dev, p.name.clone(), &p.shape, values);
            Ok(())
        })();
        if let Err(e) = result {
            error = Some(e);
        }
        seen += 1;
    };
    model.visit_mut(&mut fill);
    model.visit_buffers_mut(&mut fill);
    if let Some(e) = error {
        return Err(e);
    }
    if tensors.len() != seen {
        bail!("the file has {} tensors, the model {seen}", tensors.len());
    }
    Ok(())
}
