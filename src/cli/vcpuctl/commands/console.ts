/**
 * `vcpuctl console VM`: the guest's serial output on stdout as it comes, vCPU state changes and debug
 * values on stderr as `[vcpu 0: stopped (done)]` lines (with --json: one JSON object per event per
 * line on stdout). Without --follow it replays the buffered output and stops after the first output
 * batch or 500 ms after the server opened the stream (its response headers or first message): a
 * slow connection or server must neither cut the replay short nor hide an error such as NOT_FOUND.
 */
import * as grpc from '@grpc/grpc-js';
import type { StreamConsoleResponse__Output } from '../../../api/generated/vcpud/v1/StreamConsoleResponse';
import type { Command, Context } from '../command';
import { formatConsoleEvent, toJson } from '../format';

/** How long a console read without --follow waits for output. */
export const CONSOLE_SNAPSHOT_MS = 500;
/** With --until-done: how long to wait after the done value for the vCPU's STOPPED change. */
export const DONE_GRACE_MS = 200;

function consoleJson(ev: StreamConsoleResponse__Output): string {
  const { event } = ev;
  const dropped =
    ev.droppedOutputBytes !== '0' || ev.droppedEvents !== '0' ? { droppedOutputBytes: ev.droppedOutputBytes, droppedEvents: ev.droppedEvents } : {};
  if (event === 'output') return JSON.stringify({ output: ev.output?.toString('base64') ?? '', text: ev.output?.toString('utf8') ?? '', ...dropped });
  if (event === 'stateChange') return JSON.stringify({ stateChange: ev.stateChange, ...dropped });
  if (event === 'debug') return JSON.stringify({ debug: ev.debug, ...dropped });
  return toJson(ev).replace(/\s*\n\s*/g, ' ');
}

async function streamConsole(ctx: Context): Promise<number> {
  const follow = ctx.options.bool('follow');
  const untilDone = ctx.options.bool('until-done');
  const fromStart = !follow || ctx.options.bool('from-start');
  const client = ctx.client();
  // Without --follow the call has the usual deadline: a server that never opens the stream is an error.
  const call = client.streamConsole({ vmId: ctx.positionals[0], fromStart }, follow ? {} : client.callOptions());
  return new Promise<number>((resolve, reject) => {
    let finished = false;
    let timer: NodeJS.Timeout | undefined;
    const doneVcpus = new Set<number>();
    const finish = (code: number, error?: Error) => {
      if (finished) return;
      finished = true;
      if (timer) clearTimeout(timer);
      call.cancel();
      if (error) reject(error);
      else resolve(code);
    };
    // The snapshot window starts once the server answered (vcpud sends headers when it opens the stream).
    const startSnapshotWindow = () => {
      if (!follow && !timer && !finished) timer = setTimeout(() => finish(0), CONSOLE_SNAPSHOT_MS);
    };
    call.on('metadata', startSnapshotWindow);
    call.on('data', (ev: StreamConsoleResponse__Output) => {
      if (finished) return;
      startSnapshotWindow();
      if (!ctx.json && (ev.droppedOutputBytes !== '0' || ev.droppedEvents !== '0'))
        ctx.io.stderr.write(`[vcpud dropped ${ev.droppedOutputBytes} bytes of output and ${ev.droppedEvents} events here: this client fell behind]\n`);
      if (ctx.json) ctx.io.stdout.write(`${consoleJson(ev)}\n`);
      else if (ev.output) ctx.io.stdout.write(ev.output);
      else {
        const line = formatConsoleEvent(ev);
        if (line) ctx.io.stderr.write(`${line}\n`);
      }
      if (!follow && ev.output) finish(0);
      if (untilDone) {
        // the done value comes first, then the vCPU's STOPPED (done) change: print both, then stop
        const c = ev.stateChange;
        if (c && c.runState === 'VCPU_RUN_STATE_STOPPED' && doneVcpus.has(c.vcpuId)) finish(0);
        else if (ev.debug?.done) {
          doneVcpus.add(ev.debug.vcpuId);
          if (timer) clearTimeout(timer);
          timer = setTimeout(() => finish(0), DONE_GRACE_MS);
        }
      }
    });
    call.on('error', (e: grpc.ServiceError) => {
      if (finished) return;
      if (e.code === grpc.status.CANCELLED) return finish(0);
      finish(1, e);
    });
    call.on('end', () => finish(0));
  });
}

export const consoleCommands: Command[] = [
  {
    path: ['console'],
    summary: "Print the VM's serial console (StreamConsole); state changes and debug values go to stderr.",
    positionals: ['VM'],
    options: [
      { name: 'follow', type: 'bool', help: 'keep streaming until the VM is deleted or Ctrl-C' },
      { name: 'from-start', type: 'bool', help: 'with --follow: first replay the buffered output' },
      { name: 'until-done', type: 'bool', help: 'with --follow: stop once a vCPU has written the done port (0x501) and stopped' },
    ],
    run: streamConsole,
  },
];
