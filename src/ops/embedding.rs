//! Embedding lookup: row `ids[i]` of a `[vocab, dim]` table for each token.
//!
//! **Backward.** Output row i is a copy of table row `ids[i]`, so `∂L/∂table[r]` is the sum of
//! the upstream gradients of every output row that copied row r (a scatter-add: a token that
//! appears twice gets both contributions). Rows of tokens that did not appear get zero.

use crate::tensor::{Tensor, pool};

impl Tensor {
    /// Looks up `ids` (laid out with shape `ids_shape`) in this `[vocab, dim]` table, giving
    /// `[...ids_shape, dim]`. Panics if an id is out of range: ids from outside the program
    /// are checked by the model, which returns an error instead.
    ///
    /// ```
    /// use lego::Tensor;
    /// let table = Tensor::from_vec(vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0], &[3, 2]).requires_grad();
    /// let x = table.embedding(&[2, 0, 2], &[1, 3]); // one sequence of three tokens
    /// assert_eq!(x.shape(), &[1, 3, 2]);
    /// assert_eq!(x.to_vec(), vec![2.0, 2.0, 0.0, 0.0, 2.0, 2.0]);
    /// x.sum_all().backward();
    /// assert_eq!(table.grad().unwrap(), vec![1.0, 1.0, 0.0, 0.0, 2.0, 2.0]); // token 2 twice
    /// ```
    pub fn embedding(&self, ids: &[usize], ids_shape: &[usize]) -> Tensor {
        assert_eq!(self.rank(), 2, "embedding: the table must be [vocab, dim], got {:?}", self.shape());
        assert_eq!(
            ids.len(),
            ids_shape.iter().product::<usize>(),
            "embedding: {} ids do not fill shape {ids_shape:?}",
            ids.len()
        );
        let (vocab, dim) = (self.dim(0), self.dim(1));
        let table = self.data();
        // Output row i is a copy of table row ids[i]: [..ids_shape, dim].
        let mut out = pool::take(ids.len() * dim);
        for (i, (&id, row)) in ids.iter().zip(out.chunks_mut(dim)).enumerate() {
            assert!(id < vocab, "embedding: id {id} at position {i} is outside the vocabulary of {vocab}");
            row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
        }
        let mut out_shape = ids_shape.to_vec();
        out_shape.push(dim);
        let ids = ids.to_vec();
        Tensor::from_op(out, &out_shape, "embedding", &[self], move |g: &[f32]| {
            // Scatter-add each output row's gradient into the row it was copied from.
            let mut d_table = pool::zeroed(vocab * dim);
            for (i, &id) in ids.iter().enumerate() {
                let row = &mut d_table[id * dim..(id + 1) * dim];
                row.iter_mut().zip(&g[i * dim..(i + 1) * dim]).for_each(|(a, b)| *a += b);
            }
            vec![Some(d_table)]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::gradcheck::check_gradients;
    use crate::tensor::Tensor;

    #[test]
    fn repeated_ids_accumulate_gradient() {
        check_gradients(&[&[11, 6]], |x| x[0].embedding(&[3, 0, 3, 10, 3, 1], &[2, 3]));
    }

    #[test]
    #[should_panic(expected = "embedding: id 5 at position 1 is outside the vocabulary of 5")]
    fn out_of_range_id_names_it() {
        Tensor::zeros(&[5, 2]).embedding(&[0, 5], &[2]);
    }
}
