//! TEMPORARY scalar stand-in until the SIMD module lands (helper-1 overwrites this file).
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x)
}
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], out_t: &mut [f32]) {
    let n = w.len() / k.max(1);
    for j in 0..n {
        for i in 0..m {
            out_t[j * m + i] = dot(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        }
    }
}
pub fn softmax_in_place(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    x.iter_mut().for_each(|v| *v /= s);
}
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for i in 0..x.len() {
        out[i] = x[i] * r * weight[i];
    }
    r
}
pub fn adamw_update(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWStep) {
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2 = 1.0 - h.beta2.powi(h.step as i32);
    for i in 0..param.len() {
        param[i] *= 1.0 - h.lr * h.weight_decay;
        m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * grad[i];
        v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * grad[i] * grad[i];
        let denom = v[i].sqrt() / bc2.sqrt() + h.eps;
        param[i] -= h.lr / bc1 * m[i] / denom;
    }
}
