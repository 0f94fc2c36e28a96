//! Copying saved weights into a task's model.

use tch::Tensor;

use crate::trainer::task::TaskError;

/// Restores named weights into the tensors `task.state()` returns (they share storage with the
/// model's variables). Every name must exist with the same shape; all are checked before any is
/// copied, so a checkpoint of another model leaves this one untouched.
pub fn copy_weights_into(
    targets: &[(String, Tensor)],
    weights: &[(String, Tensor)],
) -> Result<(), TaskError> {
    let by_name: std::collections::HashMap<&str, &Tensor> =
        weights.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut pairs = Vec::with_capacity(targets.len());
    for (name, target) in targets {
        let Some(src) = by_name.get(name.as_str()) else {
            return Err(TaskError::Other(format!("checkpoint has no tensor {name}")));
        };
        if src.size() != target.size() {
            return Err(TaskError::Other(format!(
                "checkpoint tensor {name} has shape {:?}, the model {:?}",
                src.size(),
                target.size()
            )));
        }
        pairs.push((target, *src));
    }
    for (target, src) in pairs {
        let mut target = target.shallow_clone();
        tch::no_grad(|| target.copy_(src));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mismatch in the last tensor leaves the earlier, matching ones untouched too.
    #[test]
    fn weights_of_another_shape_change_nothing() {
        let targets = vec![
            (
                "a".to_string(),
                Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu)),
            ),
        ];
        let weights = vec![
            (
                "a".to_string(),
                Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu)),
            ),
        ];
        let err = copy_weights_into(&targets, &weights).unwrap_err();
        assert!(err.to_string().contains("tensor b has shape [4]"), "{err}");
        assert_eq!(targets[0].1.sum(tch::Kind::Float).double_value(&[]), 0.0);
        let fitting = vec![
            (
                "a".to_string(),
                Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::ones([3], (tch::Kind::Float, tch::Device::Cpu)),
            ),
        ];
        copy_weights_into(&targets, &fitting).unwrap();
        assert_eq!(targets[0].1.sum(tch::Kind::Float).double_value(&[]), 2.0);
    }
}
