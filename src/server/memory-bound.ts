/**
 * The memory vcpud can be made to hold beyond its idle RSS and its guests' memory, from the
 * configured caps: README.md ("Memory bound") states it, the abuse tests check it. Each term is what
 * one mechanism bounds; the constants come from where they are enforced.
 */
import { MAX_METADATA_PAYLOAD } from '../vm/snapshot-format';
import { CONSOLE_HISTORY_BYTES } from '../vm/console';
import type { Config } from './config';
import { STATE_MESSAGE_MAX, UPLOAD_MESSAGE_MAX } from './request-limits';
import { STREAM_CHUNK, STREAM_IN_FLIGHT } from './services/snapshot-service';
import { READ_MEMORY_SEND_WINDOW } from './services/vm-service';

/** Node's HTTP/2 initial per-stream receive window: what a paused stream can have buffered. */
const HTTP2_STREAM_WINDOW = 64 * 1024;

/**
 * Per open stream: its receive window, a state-sized request being assembled, and the larger of
 * the send windows (ReadMemory's; StreamConsole's is smaller) with the two copies of a message that
 * framing makes on the way into it (protobuf encoding, then the 5-byte gRPC prefix), garbage until
 * V8 collects it.
 */
export const PER_STREAM_BYTES = HTTP2_STREAM_WINDOW + STATE_MESSAGE_MAX + 3 * READ_MEMORY_SEND_WINDOW;

/**
 * Per VM (VMs and restore uploads together are at most --max-vms): its console history; one snapshot
 * or migration stream (one at a time per VM) with its chunks in flight plus the one being made; one
 * upload's header (read before its memory is reserved) and two messages in hand.
 */
export const PER_VM_BYTES = CONSOLE_HISTORY_BYTES + (STREAM_IN_FLIGHT + 1) * STREAM_CHUNK + MAX_METADATA_PAYLOAD + 2 * UPLOAD_MESSAGE_MAX;

/** N of "idle RSS + guest memory + N": bytes, for `maxConnections` connections at once (at most --max-connections). */
export function memoryBoundBytes(
  config: Pick<Config, 'maxRequestBytesInFlight' | 'maxConcurrentStreams' | 'maxConnections' | 'limits'>,
  maxConnections: number = config.maxConnections,
): number {
  return config.maxRequestBytesInFlight + maxConnections * config.maxConcurrentStreams * PER_STREAM_BYTES + config.limits.maxVms * PER_VM_BYTES;
}
