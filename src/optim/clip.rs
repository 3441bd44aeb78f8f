//! Global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! The norm is taken over all gradients together, `‖g‖ = √(Σ over every element g²)`; if it
//! exceeds `max_norm`, every gradient is scaled by `max_norm / (‖g‖ + 10⁻⁶)`, which keeps the
//! direction of the step and bounds its size.

use crate::tensor::Tensor;

/// Clips the gradients of `params` to a global norm of at most `max_norm`, and returns the
/// norm before clipping. Parameters without a gradient are ignored.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f32) -> f32 {
    let sum_sq: f64 = params
        .iter()
        .map(|p| p.with_grad(|g| g.map_or(0.0, |g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())))
        .sum();
    let norm = sum_sq.sqrt() as f32;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for p in params {
            p.with_grad_mut(|g| {
                if let Some(g) = g {
                    g.iter_mut().for_each(|x| *x *= scale);
                }
            });
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_down_to_max_norm_and_leaves_small_gradients() {
        let a = Tensor::zeros(&[2]).requires_grad();
        a.accumulate_grad(vec![3.0, 4.0]);
        assert!((clip_grad_norm(std::slice::from_ref(&a), 1.0) - 5.0).abs() < 1e-6);
        let g = a.grad().unwrap();
        assert!(((g[0] * g[0] + g[1] * g[1]).sqrt() - 1.0).abs() < 1e-5);
        assert!((clip_grad_norm(std::slice::from_ref(&a), 10.0) - 1.0).abs() < 1e-5);
        assert!(((a.grad().unwrap()[0]) - g[0]).abs() < 1e-9);
    }
}
