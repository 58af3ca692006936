/**
 * The shares of a vcpud `node --cpu-prof` profile's busy main-thread time, by stage of a call (self time
 * bucketed by source file; start-up, reflection setup and idle time left out). For GetState's breakdown:
 *
 *   node --cpu-prof --cpu-prof-dir DIR dist/src/server/main.js --listen unix:/tmp/v.sock   (then create a
 *   paused VM, run node dist/bench/loadgen.js --target unix:/tmp/v.sock --vm ID --clients 64 --duration 8,
 *   stop vcpud with SIGINT)
 *   node dist/bench/cpuprofile-shares.js DIR/*.cpuprofile
 *
 * The profiler samples wall time: on a loaded host a stage's share is indicative, not its CPU time.
 */
import fs from 'node:fs';
import { fatal } from './floors';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string };
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

/** [stage, test on url and function name], first match wins. */
const STAGES: [string, (url: string, fn: string) => boolean][] = [
  ['GC (main thread)', (_, fn) => fn === '(garbage collector)'],
  ['ffi: the ioctls and their wrappers (src/ffi)', (url) => /src\/ffi\//.test(url)],
  ['vCPU lock and save order (src/vm)', (url) => /src\/vm\//.test(url)],
  ['encoding the response', (url, fn) => /src\/server\/(convert|wire-encoder)/.test(url) || (url === '' && /^encode/.test(fn))],
  ['metrics (prom-client)', (url) => /prom-client|src\/server\/(metrics|bound-histogram)/.test(url)],
  ['metrics+logging interceptor', (url) => /src\/server\/interceptors/.test(url)],
  ['logging', (url) => /src\/server\/logging/.test(url)],
  ['request-limits interceptor', (url) => /src\/server\/request-limits/.test(url)],
  ['connection injector', (url) => /src\/server\/connections/.test(url)],
  ['state service and handler wrapper', (url) => /src\/server\//.test(url)],
  ['grpc-js', (url) => /@grpc\/grpc-js/.test(url)],
  ['request decoding (protobufjs)', (url, fn) => /protobufjs/.test(url) || /\$decode|\$toObject/.test(fn)],
  [
    'Node: HTTP/2, streams, buffers, microtasks',
    (url, fn) =>
      /http2|stream|net|buffer|events|timers|task_queues|async_hooks/.test(url) ||
      ['runMicrotasks', 'utf8Slice', 'utf8Write', 'writeBuffer', 'getAsyncId'].includes(fn),
  ],
];

/** Frames under which a sample is start-up or set-up, not serving. */
const isSetup = (f: ProfileNode['callFrame']) =>
  f.functionName === 'Module._load' || (f.functionName === 'main' && f.url.endsWith('main.js')) || f.url.includes('@grpc/reflection');

export function shares(profile: Profile): { busyMs: number; stages: [string, number][] } {
  const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const selfUs = new Map<number, number>();
  profile.samples.forEach((id, i) => {
    selfUs.set(id, (selfUs.get(id) ?? 0) + profile.timeDeltas[i]);
  });
  const setup = (id: number) => {
    for (let x: number | undefined = id; x !== undefined; x = parent.get(x)) if (isSetup(nodes.get(x)!.callFrame)) return true;
    return false;
  };
  const by = new Map<string, number>();
  let busy = 0;
  for (const [id, us] of selfUs) {
    const { url, functionName } = nodes.get(id)!.callFrame;
    if (functionName === '(idle)' || setup(id)) continue;
    busy += us;
    const stage = STAGES.find(([, test]) => test(url, functionName))?.[0] ?? 'other';
    by.set(stage, (by.get(stage) ?? 0) + us);
  }
  return { busyMs: busy / 1000, stages: [...by].map(([s, us]): [string, number] => [s, us / busy]).sort((a, b) => b[1] - a[1]) };
}

function main(): void {
  const file = process.argv[2];
  if (!file) throw new Error('usage: node dist/bench/cpuprofile-shares.js FILE.cpuprofile');
  const r = shares(JSON.parse(fs.readFileSync(file, 'utf8')) as Profile);
  console.log(`busy main-thread time (set-up excluded): ${r.busyMs.toFixed(0)} ms`);
  for (const [stage, share] of r.stages) console.log(`${(share * 100).toFixed(1).padStart(5)}%  ${stage}`);
}

if (require.main === module) {
  try {
    main();
  } catch (e) {
    fatal(e);
  }
}
