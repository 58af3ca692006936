/**
 * What a process holds, read from /proc, for leak checks against a real vcpud (and the benchmarks):
 * its open fds, its resident memory, its main thread's wake-ups, and its metrics scraped without keeping a connection (a keep-alive scrape would itself hold an fd in
 * the server for seconds and blur the count).
 */
import fs from 'node:fs';
import http from 'node:http';
import { samples } from './prom';

export const fdCount = (pid: number): number => fs.readdirSync(`/proc/${pid}/fd`).length;

/** A size field of /proc/PID/status (given in kB there), in bytes. */
function statusBytes(pid: number, field: string): number {
  const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}

/** Resident set size of a process (VmRSS of /proc/PID/status), in bytes. */
export const rssBytes = (pid: number): number => statusBytes(pid, 'VmRSS');

/** Its anonymous part (RssAnon): what committing private memory adds, whatever happens to its file pages. */
export const rssAnonBytes = (pid: number): number => statusBytes(pid, 'RssAnon');

/** Times the process's main thread went to sleep and woke again (its voluntary context switches). */
export function mainThreadWakeups(pid: number): number {
  const m = /voluntary_ctxt_switches:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/task/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no voluntary_ctxt_switches in /proc/${pid}/task/${pid}/status`);
  return Number(m[1]);
}

/** fd -> what it points at (socket:[n], /dev/kvm, anon_inode:kvm-vcpu:0, a file...). */
export function fdTargets(pid: number): Map<string, string> {
  const out = new Map<string, string>();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      out.set(fd, fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
    } catch {
      // closed while listing
    }
  }
  return out;
}

/**
 * Waits (up to `ms`) until `pid` holds no fd that it did not hold at `baseline` (same number, same
 * target: a socket or file opened since is new even if it reuses a number); sockets and files of a
 * finished call close asynchronously. Fails listing the new ones.
 */
export async function expectFdsBack(pid: number, baseline: { count: number; targets: Map<string, string> }, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    const extra = [...fdTargets(pid)].filter(([fd, t]) => baseline.targets.get(fd) !== t);
    if (!extra.length) return;
    if (Date.now() > end) throw new Error(`${what}: ${extra.length} fd(s) opened since and still open: ${extra.map(([fd, t]) => `${fd} -> ${t}`).join(', ')}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export function fdBaseline(pid: number): { count: number; targets: Map<string, string> } {
  return { count: fdCount(pid), targets: fdTargets(pid) };
}

/** GET /metrics on a fresh connection that the server closes after answering. */
export function scrapeClosing(hostPort: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get(`http://${hostPort}/metrics`, { agent: false, headers: { connection: 'close' } }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve(body));
    });
    req.on('error', reject);
  });
}

/** grpc_server_handled_total of one method, by code (codes with a zero count left out). */
export function handledByCode(text: string, service: string, method: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const s of samples(text, 'grpc_server_handled_total'))
    if (s.labels.grpc_service === service && s.labels.grpc_method === method && s.value) out[s.labels.grpc_code] = s.value;
  return out;
}
