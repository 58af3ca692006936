/**
 * A second vcpud whose metrics port is taken (issue 15, item 6): it must say that the metrics
 * listener failed and name --metrics-listen, not only "EADDRINUSE 127.0.0.1:9464".
 */
import { describeKvm } from '../support/kvm';
import { startVcpud, type VcpudProcess } from '../support/vcpud-process';

describeKvm('a second vcpud on the same metrics port', () => {
  let first: VcpudProcess;
  beforeAll(async () => {
    first = await startVcpud();
  });
  afterAll(() => first.stop());

  it('fails to start naming the metrics listener and --metrics-listen', async () => {
    const taken = first.serving.metrics;
    const failure = await startVcpud(['--metrics-listen', taken]).then(
      async (d) => (await d.stop(), 'started'),
      (e: Error) => e.message,
    );
    expect(failure).toContain(`cannot serve metrics on ${taken} (--metrics-listen): EADDRINUSE`);
    expect(failure).toMatch(/give this vcpud its own --metrics-listen HOST:PORT/);
  });
});
