/**
 * A Unix-socket proxy that delays every chunk, in both directions, by a fixed time (order kept):
 * a slow link or a slow server in front of a real vcpud, for client timing bugs.
 */
import fs from 'node:fs';
import net from 'node:net';

export interface DelayProxy {
  /** unix:PATH to dial instead of the target. */
  address: string;
  close(): Promise<void>;
}

function delayed(from: net.Socket, to: net.Socket, delayMs: number): void {
  from.on('data', (chunk) => void setTimeout(() => to.destroyed || to.write(chunk), delayMs));
  from.on('end', () => void setTimeout(() => to.end(), delayMs));
  from.on('error', () => to.destroy());
  from.on('close', () => void setTimeout(() => to.destroy(), delayMs));
}

/** Listens on `socketPath` and forwards each connection to the Unix socket `targetPath`, `delayMs` late. */
export async function startDelayProxy(socketPath: string, targetPath: string, delayMs: number): Promise<DelayProxy> {
  fs.rmSync(socketPath, { force: true });
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPath);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
    }
    delayed(client, upstream, delayMs);
    delayed(upstream, client, delayMs);
  });
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(socketPath, resolve));
  return {
    address: `unix:${socketPath}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
