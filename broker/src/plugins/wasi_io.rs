//! The blocking calls of `wasi:io` (poll, pollable `ready`/`block`, the `blocking-*`
//! stream methods, stream drops), made safe for hook calls that run on the broker's tokio
//! worker threads.
//!
//! wasmtime-wasi's synchronous bindings run each of these through `in_tokio`, which calls
//! `Handle::block_on`: from a worker thread that panics ("Cannot start a runtime from
//! within a runtime"), and the panic ends the connection task. A guest reaches them with
//! any `eprintln!` or panic message (stderr's `blocking-flush`), any sleep (a monotonic
//! clock pollable's `block`), and any socket or HTTP wait. Here each call first polls its
//! future once: stdio (a sink), a ready pollable or a finished write complete at once, on
//! the worker, for tens of nanoseconds. Only a call that must really wait leaves the
//! worker (`block_in_place`, so the worker's other tasks move to another thread), and the
//! wait ends with the call's time budget (what is left of `time_ms`), since the epoch
//! deadline cannot interrupt the host while the guest waits in it. A hook call that makes
//! no such call costs nothing more.
//!
//! Registered over wasmtime-wasi's own bindings of the same interfaces (linker
//! shadowing), with the same resource types, so everything else of WASI is unchanged.

use std::future::Future;
use std::time::Duration;

use wasmtime::component::{HasData, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::io::poll as async_poll;
use wasmtime_wasi::p2::bindings::io::streams::{
    HostInputStream as AsyncHostInputStream, HostOutputStream as AsyncHostOutputStream,
};
use wasmtime_wasi::p2::bindings::sync::io::poll as sync_poll;
use wasmtime_wasi::p2::bindings::sync::io::streams as sync_streams;
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, StreamError, StreamResult};
use wasmtime_wasi::runtime::{in_tokio, poll_noop, with_ambient_tokio_runtime};

/// The instance's resource table, and how long one wait may take.
pub struct Io<'a> {
    /// The instance's resources.
    pub table: &'a mut ResourceTable,
    /// The longest wait: what is left of the running call's time budget.
    pub cap: Duration,
}

/// Marker for the linker: the host data is an [`Io`].
pub struct SafeIo;

impl HasData for SafeIo {
    type Data<'a> = Io<'a>;
}

/// Runs `fut` to completion without entering the runtime from inside it: one poll in
/// place; if that is not enough, on this thread outside the runtime's worker role, for at
/// most `cap`.
fn wait<F: Future>(cap: Duration, fut: F) -> wasmtime::Result<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Some(v) = with_ambient_tokio_runtime(|| poll_noop(fut.as_mut())) {
        return Ok(v);
    }
    let timed = async { tokio::time::timeout(cap, fut).await };
    let r = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            // On a worker: hand its other tasks over and wait here. Elsewhere (a blocking
            // thread) block_in_place just runs the closure.
            tokio::task::block_in_place(|| in_tokio(timed))
        }
        Ok(_) if tokio::task::try_id().is_some() => {
            return Err(wasmtime::format_err!(
                "plugin made a blocking WASI call on a current-thread runtime"
            ));
        }
        _ => in_tokio(timed),
    };
    r.map_err(|_| wasmtime::format_err!("plugin waited on I/O longer than its time budget"))
}

/// [`wait`] for stream calls, whose errors carry a trap.
fn wait_stream<T, F: Future<Output = StreamResult<T>>>(cap: Duration, fut: F) -> StreamResult<T> {
    wait(cap, fut).map_err(StreamError::Trap)?
}

impl sync_poll::Host for Io<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        wait(self.cap, async_poll::Host::poll(self.table, pollables))?
    }
}

impl sync_poll::HostPollable for Io<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        wait(
            self.cap,
            async_poll::HostPollable::ready(self.table, pollable),
        )?
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        wait(
            self.cap,
            async_poll::HostPollable::block(self.table, pollable),
        )?
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.table, pollable)
    }
}

impl sync_streams::Host for Io<'_> {
    fn convert_stream_error(
        &mut self,
        err: StreamError,
    ) -> wasmtime::Result<sync_streams::StreamError> {
        sync_streams::Host::convert_stream_error(self.table, err)
    }
}

impl sync_streams::HostOutputStream for Io<'_> {
    fn drop(&mut self, stream: Resource<DynOutputStream>) -> wasmtime::Result<()> {
        wait(self.cap, AsyncHostOutputStream::drop(self.table, stream))?
    }

    fn check_write(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<u64> {
        AsyncHostOutputStream::check_write(self.table, stream)
    }

    fn write(&mut self, stream: Resource<DynOutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        AsyncHostOutputStream::write(self.table, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        let fut = AsyncHostOutputStream::blocking_write_and_flush(self.table, stream, bytes);
        wait_stream(self.cap, fut)
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<DynOutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        let fut = AsyncHostOutputStream::blocking_write_zeroes_and_flush(self.table, stream, len);
        wait_stream(self.cap, fut)
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynOutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncHostOutputStream::subscribe(self.table, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<DynOutputStream>, len: u64) -> StreamResult<()> {
        AsyncHostOutputStream::write_zeroes(self.table, stream, len)
    }

    fn flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        AsyncHostOutputStream::flush(self.table, Resource::new_borrow(stream.rep()))
    }

    fn blocking_flush(&mut self, stream: Resource<DynOutputStream>) -> StreamResult<()> {
        let fut =
            AsyncHostOutputStream::blocking_flush(self.table, Resource::new_borrow(stream.rep()));
        wait_stream(self.cap, fut)
    }

    fn splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        AsyncHostOutputStream::splice(self.table, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<DynOutputStream>,
        src: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        let fut = AsyncHostOutputStream::blocking_splice(self.table, dst, src, len);
        wait_stream(self.cap, fut)
    }
}

impl sync_streams::HostInputStream for Io<'_> {
    fn drop(&mut self, stream: Resource<DynInputStream>) -> wasmtime::Result<()> {
        wait(self.cap, AsyncHostInputStream::drop(self.table, stream))?
    }

    fn read(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<Vec<u8>> {
        AsyncHostInputStream::read(self.table, stream, len)
    }

    fn blocking_read(
        &mut self,
        stream: Resource<DynInputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        wait_stream(
            self.cap,
            AsyncHostInputStream::blocking_read(self.table, stream, len),
        )
    }

    fn skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        AsyncHostInputStream::skip(self.table, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<DynInputStream>, len: u64) -> StreamResult<u64> {
        wait_stream(
            self.cap,
            AsyncHostInputStream::blocking_skip(self.table, stream, len),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<DynInputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncHostInputStream::subscribe(self.table, stream)
    }
}

/// Registers the safe `wasi:io/poll` and `wasi:io/streams` over wasmtime-wasi's.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    io: fn(&mut T) -> Io<'_>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    sync_poll::add_to_linker::<T, SafeIo>(linker, io)?;
    sync_streams::add_to_linker::<T, SafeIo>(linker, io)?;
    linker.allow_shadowing(false);
    Ok(())
}
