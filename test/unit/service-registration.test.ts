/**
 * Services are registered one way: every vcpud service adds the definition vcpudServiceDefinitions()
 * holds for it (no per-service copies of proto-loader's definitions), and the API server learns what
 * was registered through the sink it hands the services, without replacing grpc.Server.addService.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type { HostCapabilities } from '../../src/ffi/capabilities';
import { loadConfig } from '../../src/server/config';
import { Health } from '../../src/server/health';
import { createLogger } from '../../src/server/logging';
import { Metrics } from '../../src/server/metrics';
import { Preserialized } from '../../src/api/preserialized';
import { vcpudServiceDefinitions, type VcpudServiceDefinitions } from '../../src/server/service-definitions';
import { createVcpudServer, type ServiceSink } from '../../src/server/server';
import type { ServiceContext } from '../../src/server/services/context';
import { MigrationService } from '../../src/server/services/migration-service';
import { SnapshotService } from '../../src/server/services/snapshot-service';
import { VcpuStateService } from '../../src/server/services/state-service';
import { VmService } from '../../src/server/services/vm-service';
import type { VmRegistry } from '../../src/vm/registry';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-registration-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const ctx: ServiceContext = { registry: {} as VmRegistry, caps: {} as HostCapabilities, shuttingDown: () => false };

function services() {
  return {
    VcpuStateService: new VcpuStateService(ctx),
    VmService: new VmService(ctx),
    SnapshotService: new SnapshotService(ctx, { snapshotDir: dir, uploadStallTimeoutMs: 1000 } as never),
    MigrationService: new MigrationService(ctx, { stallMs: 1000 }),
  };
}

describe('service registration', () => {
  it('each vcpud service adds exactly the definition vcpudServiceDefinitions() has for it', () => {
    const added: grpc.ServiceDefinition[] = [];
    const sink: ServiceSink = { addService: (definition) => void added.push(definition) };
    for (const [name, service] of Object.entries(services())) {
      added.length = 0;
      service.register(sink);
      expect({ name, same: added.length === 1 && added[0] === vcpudServiceDefinitions()[name as keyof VcpudServiceDefinitions] }).toEqual({ name, same: true });
    }
  });

  it('CreateSnapshot sends Preserialized bytes as they are, through the shared definition', () => {
    const bytes = Buffer.from([0x0a, 0x01, 0x07]);
    expect(vcpudServiceDefinitions().SnapshotService.CreateSnapshot.responseSerialize(new Preserialized(bytes) as never)).toBe(bytes);
  });

  it('no service handler casts through unknown: replies and client calls are typed (AnsweringPreserialized, callUnary)', () => {
    const servicesDir = path.join(__dirname, '../../src/server/services');
    const casts = fs
      .readdirSync(servicesDir)
      .filter((f) => f.endsWith('.ts'))
      .flatMap((f) =>
        fs
          .readFileSync(path.join(servicesDir, f), 'utf8')
          .split('\n')
          .map((line, i) => ({ at: `${f}:${i + 1}`, line }))
          .filter(({ line }) => /\bas unknown as\b/.test(line)),
      )
      .map(({ at }) => at);
    expect(casts).toEqual([]);
  });

  it('GetState sends Preserialized bytes as they are, through the shared definition', () => {
    const bytes = Buffer.from([0x08, 0x01]);
    expect(vcpudServiceDefinitions().VcpuStateService.GetState.responseSerialize(new Preserialized(bytes) as never)).toBe(bytes);
  });

  it('the API server lists what was registered without replacing grpc.Server.addService', async () => {
    const config = loadConfig(['--listen', `unix:${path.join(dir, 'api.sock')}`, '--metrics-listen', ''], {}, dir);
    const logger = createLogger({ level: 'error', sink: () => {} });
    const s = services();
    const running = await createVcpudServer(config, {
      logger,
      metrics: new Metrics({ defaultMetrics: false }),
      health: new Health({ logger }),
      services: [s.VmService, s.VcpuStateService],
    });
    try {
      expect(Object.hasOwn(running.server, 'addService')).toBe(false);
      expect(running.server.addService).toBe(grpc.Server.prototype.addService);
      expect(running.services).toEqual(expect.arrayContaining(['grpc.health.v1.Health', 'vcpud.v1.VcpuStateService', 'vcpud.v1.VmService']));
      expect(running.services).not.toContain('vcpud.v1.SnapshotService');
    } finally {
      await running.shutdown(100);
    }
  });
});
