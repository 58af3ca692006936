/**
 * The restart handover's manifest (src/vm/handover.ts): what decodeManifest accepts and how it
 * refuses the rest: another format version first (HandoverVersionError, the files are left for the
 * vcpud that wrote them), then a short or damaged body, then entries naming files outside the state
 * directory. And the console history a handed-over VM continues from.
 */
import { ConsoleBuffer } from '../../src/vm/console';
import { decodeManifest, encodeManifest, HANDOVER_FORMAT_VERSION, HandoverVersionError, type Manifest, type ManifestVm } from '../../src/vm/handover';

const vm = (over: Partial<ManifestVm> = {}): ManifestVm => ({
  id: '0d1c4a4e-9f6e-4a8e-9a3c-1f1e2d3c4b5a',
  name: 'counter',
  createdAt: '2026-12-05T01:00:00.000Z',
  memoryFile: '5b1c9c3e-0000-4000-8000-000000000000.mem',
  memoryBytes: 4 << 20,
  vcpuCount: 1,
  stateFile: '0d1c4a4e-9f6e-4a8e-9a3c-1f1e2d3c4b5a.state',
  stateBytes: 1234,
  stateCrc32c: 0xdeadbeef,
  console: { history: Buffer.from('1\n2\n').toString('base64'), bytesWritten: 4 },
  ...over,
});
const manifest = (vms: ManifestVm[] = [vm()]): Manifest => ({
  format: 'vcpud-handover',
  formatVersion: HANDOVER_FORMAT_VERSION,
  createdAt: '2026-12-05T01:00:00.000Z',
  producer: { name: 'vcpud', version: '0.0.0' },
  vms,
});

describe('handover manifest', () => {
  it('round-trips', () => {
    expect(decodeManifest(encodeManifest(manifest()), 'm')).toEqual(manifest());
  });

  it('refuses another format version before looking at anything else, naming both versions', () => {
    const bytes = Buffer.from(
      encodeManifest(manifest())
        .toString('latin1')
        .replace(/^vcpud-handover 1 \S+ \d+/, 'vcpud-handover 7 0 0'),
      'latin1',
    );
    let err: unknown;
    try {
      decodeManifest(bytes, '/state/handover.manifest');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(HandoverVersionError);
    expect((err as Error).message).toMatch(/format version 7; this vcpud .* reads version 1 only: run the vcpud version that wrote it/);
  });

  it.each([
    ['an empty file', () => Buffer.alloc(0), /first line/],
    ['no first line', () => Buffer.from('{"format":"vcpud-handover"}'), /first line/],
    ['a truncated body', () => encodeManifest(manifest()).subarray(0, -3), /the body is \d+ bytes, the first line says/],
    ['a flipped bit', () => flip(encodeManifest(manifest()), -10), /checksum mismatch/],
    ['a memory file outside the directory', () => encodeManifest(manifest([vm({ memoryFile: '../../etc/passwd' })])), /malformed VM entry/],
    ['a state file with a directory', () => encodeManifest(manifest([vm({ stateFile: 'a/b.state' })])), /malformed VM entry/],
    ['no VM list', () => encodeManifest({ ...manifest(), vms: undefined as unknown as ManifestVm[] }), /malformed body/],
  ])('refuses %s as corrupt (DATA_LOSS)', (_what, bytes, message) => {
    expect(() => decodeManifest(bytes(), 'm')).toThrow(expect.objectContaining({ kind: 'data_loss', message: expect.stringMatching(message) }));
  });

  it('a console restored from a manifest continues its history and its byte count', () => {
    const c = new ConsoleBuffer(8);
    c.restore(Buffer.from('45678'), 1000);
    c.append(Buffer.from('9ab'));
    expect(c.history().toString()).toBe('456789ab');
    expect(c.bytesWritten).toBe(1003);
  });
});

function flip(b: Buffer, at: number): Buffer {
  const c = Buffer.from(b);
  c[c.length + at] ^= 0x01;
  return c;
}
