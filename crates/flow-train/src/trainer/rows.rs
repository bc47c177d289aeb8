//! Where a run's training rows come from: all held on the device, or streamed from a
//! file a chunk at a time, in the order of the epoch either way.

use candle::{DType, Device, Tensor};

use crate::{
    data::{ChunkReader, Dataset, StreamSource},
    StreamPosition, TrainError,
};

/// The training rows of a run and the order of the current epoch.
pub(super) enum TrainRows<'a> {
    /// Every row and its context on the device; `order` is the epoch's.
    Held {
        x: Tensor,
        c: Option<Tensor>,
        order: Vec<usize>,
    },
    Streamed(Box<Streamed<'a>>),
}

/// Rows read from a file, one chunk held at a time.
pub(super) struct Streamed<'a> {
    source: &'a StreamSource,
    reader: ChunkReader<'a>,
    seed: u64,
    epoch: usize,
    /// The epoch's order of chunks, and where each starts in the epoch's order of rows
    /// (one more entry: the number of rows).
    chunks: Vec<usize>,
    starts: Vec<usize>,
    /// The chunk held: its place in `chunks`, its rows in file order and the epoch's
    /// order of them.
    held: Option<(usize, Dataset, Vec<usize>)>,
}

impl<'a> TrainRows<'a> {
    /// Rows streamed from `source`, in the order of epoch `epoch` of a run seeded
    /// with `seed`.
    pub(super) fn streamed(
        source: &'a StreamSource,
        seed: u64,
        epoch: usize,
    ) -> Result<Self, TrainError> {
        let mut s = Streamed {
            source,
            reader: source.reader()?,
            seed,
            epoch,
            chunks: Vec::new(),
            starts: Vec::new(),
            held: None,
        };
        s.begin_epoch(epoch);
        Ok(Self::Streamed(Box::new(s)))
    }

    /// Rows in an epoch.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::Held { order, .. } => order.len(),
            Self::Streamed(s) => s.source.len(),
        }
    }

    /// Starts epoch `epoch`'s order of a run seeded with `seed`.
    pub(super) fn begin_epoch(&mut self, seed: u64, epoch: usize) {
        match self {
            Self::Held { order, .. } => *order = super::epoch_order(order.len(), seed, epoch),
            Self::Streamed(s) => s.begin_epoch(epoch),
        }
    }

    /// Rows `from..from + n` of the epoch's order, as stored (bytes or f32), and their
    /// context in `dtype`.
    pub(super) fn take(
        &mut self,
        from: usize,
        n: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Option<Tensor>), TrainError> {
        match self {
            Self::Held { x, c, order } => {
                let idx: Vec<u32> = order[from..from + n].iter().map(|&i| i as u32).collect();
                let idx = Tensor::from_vec(idx, n, device)?;
                let c = c.as_ref().map(|c| c.index_select(&idx, 0)).transpose()?;
                Ok((x.index_select(&idx, 0)?, c))
            }
            Self::Streamed(s) => {
                let batch = s.take(from, n)?;
                let x = batch.to_tensor(device)?;
                let c = batch.context_tensor(device)?;
                Ok((x, c.map(|c| c.to_dtype(dtype)).transpose()?))
            }
        }
    }

    /// Where `pos` rows into the epoch stand in chunks, for streamed rows.
    pub(super) fn position(&self, pos: usize) -> Option<StreamPosition> {
        match self {
            Self::Held { .. } => None,
            Self::Streamed(s) => Some(s.position(pos)),
        }
    }
}

impl Streamed<'_> {
    fn begin_epoch(&mut self, epoch: usize) {
        self.epoch = epoch;
        self.chunks = self.source.chunk_order(self.seed, epoch);
        self.starts = std::iter::once(0)
            .chain(self.chunks.iter().scan(0, |at, &c| {
                *at += self.source.chunk_len(c);
                Some(*at)
            }))
            .collect();
        self.held = None;
    }

    /// The place in the epoch's order of chunks of the chunk that holds row `pos` of
    /// the epoch's order, and the row's place within it.
    fn position(&self, pos: usize) -> StreamPosition {
        let chunk = self.starts.partition_point(|&s| s <= pos) - 1;
        StreamPosition {
            chunk_rows: self.source.chunk_rows(),
            chunk,
            row: pos - self.starts[chunk],
        }
    }

    /// Rows `from..from + n` of the epoch's order, reading chunks as they are reached.
    fn take(&mut self, from: usize, n: usize) -> Result<Dataset, TrainError> {
        let s = self.source;
        let (dim, context_dim) = (s.dim(), s.context_dim());
        let mut out = Dataset {
            dim,
            context_dim,
            ..Dataset::default()
        };
        for pos in from..from + n {
            let at = self.position(pos);
            if self.held.as_ref().is_none_or(|h| h.0 != at.chunk) {
                // The chunk held before is dropped first: one is held at a time.
                self.held = None;
                let file_chunk = self.chunks[at.chunk];
                let rows = self.reader.read(file_chunk)?;
                let order = s.row_order(self.seed, self.epoch, file_chunk);
                self.held = Some((at.chunk, rows, order));
            }
            let (_, rows, order) = self.held.as_ref().expect("a chunk was just read");
            let r = order[at.row];
            if rows.holds_pixels() {
                out.pixels
                    .extend_from_slice(&rows.pixels[r * dim..(r + 1) * dim]);
            } else {
                out.values
                    .extend_from_slice(&rows.values[r * dim..(r + 1) * dim]);
            }
            out.context
                .extend_from_slice(&rows.context[r * context_dim..(r + 1) * context_dim]);
        }
        Ok(out)
    }
}
