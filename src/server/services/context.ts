/** What the services share: the VMs, the host's capabilities, and hooks into metrics and shutdown. */
import type * as grpc from '@grpc/grpc-js';
import { VcpudError } from '../../errors';
import type { HostCapabilities } from '../../ffi/capabilities';
import type { VmRegistry } from '../../vm/registry';
import { toServiceError } from '../errors';
import { decodedRequest } from '../undecodable-request';

export interface ServiceContext {
  registry: VmRegistry;
  caps: HostCapabilities;
  /** The recorder of a state section's bytes served, for vcpud_state_bytes (bound once, used per call). */
  stateBytes?(section: string): (bytes: number) => void;
  /** True once shutdown began: new calls get UNAVAILABLE. */
  shuttingDown(): boolean;
  /** Test-only: SetNestedState may skip validation when a call carries x-vcpud-skip-validation: 1. */
  allowUnvalidatedNested?: boolean;
}

function checkOpen(ctx: ServiceContext): void {
  if (ctx.shuttingDown()) throw new VcpudError('unavailable', 'vcpud is shutting down');
}

/**
 * `f` of a value that may still be coming: at once for a value, after it for a promise. State accesses
 * of a paused vCPU (withStateNow) give their value in the request's turn, and the answer follows in it.
 */
export function thenOrNow<T, R>(v: T | Promise<T>, f: (value: T) => R): R | Promise<R> {
  return v instanceof Promise ? v.then(f) : f(v);
}

/** A unary handler from a function giving a value or a promise: every thrown error goes through the one error table. */
export function unary<Req, Res>(
  ctx: ServiceContext,
  fn: (req: Req, call: grpc.ServerUnaryCall<Req, Res>) => Promise<Res> | Res,
): grpc.handleUnaryCall<Req, Res> {
  return (call, cb) => {
    // Started right away (not from a microtask), and a result that is not a promise answered in this
    // turn: a GetState of a paused vCPU goes from request to response without a promise hop.
    let result: Promise<Res> | Res;
    try {
      checkOpen(ctx);
      result = fn(decodedRequest(call.request), call);
    } catch (e) {
      cb(toServiceError(e));
      return;
    }
    if (!(result instanceof Promise)) {
      cb(null, result);
      return;
    }
    result.then(
      (res) => cb(null, res),
      (e) => cb(toServiceError(e)),
    );
  };
}

/** A server-streaming handler: `fn` writes and resolves when done; errors end the stream with a status. */
export function serverStream<Req, Res>(
  ctx: ServiceContext,
  fn: (call: grpc.ServerWritableStream<Req, Res>) => Promise<void>,
): grpc.handleServerStreamingCall<Req, Res> {
  return (call) => {
    Promise.resolve()
      .then(() => {
        checkOpen(ctx);
        decodedRequest(call.request);
        return fn(call);
      })
      .then(
        () => call.end(),
        // grpc-js turns an 'error' event on a server stream into the call's final status.
        (e) => call.emit('error', Object.assign(new Error((e as Error).message), toServiceError(e))),
      );
  };
}
