/**
 * vcpud over mTLS in tests, with a PKI from pki.ts: the argument lists that serve the API or dial
 * migration destinations with its certificates, the client address its server certificate names,
 * and the migration pair (a destination allowing the test's `orchestrator` client and the source's
 * `migrator` certificate; a source dialling as `migrator`).
 */
import type { Pki } from './pki';
import { startVcpud, type VcpudProcess } from './vcpud-process';

/** The client certificate tests call vcpud's API with. */
export const ORCHESTRATOR = 'orchestrator';
/** The client certificate a migration source presents to its destination. */
export const MIGRATOR = 'migrator';

/** Issues a client certificate for each name (subject CN=name, extendedKeyUsage clientAuth). */
export function issueClients(pki: Pki, ...names: string[]): void {
  for (const name of names) pki.issue(name, `/CN=${name}`, 'extendedKeyUsage=clientAuth\n');
}

/** vcpud arguments serving the API with mTLS on 127.0.0.1 (an ephemeral port), allowing `allow` (none given: any certificate the CA signed). */
export function mtlsServeArgs(pki: Pki, allow: string[] = []): string[] {
  return [
    '--listen',
    '127.0.0.1:0',
    '--tls-cert',
    pki.file('server.crt'),
    '--tls-key',
    pki.file('server.key'),
    '--tls-ca',
    pki.file('ca.crt'),
    ...allow.flatMap((name) => ['--allow-client', name]),
  ];
}

/** vcpud arguments for dialling migration destinations as client `name`, trusting the CA. */
export function migrationDialArgs(pki: Pki, name: string): string[] {
  return ['--migration-tls-ca', pki.file('ca.crt'), '--migration-tls-cert', pki.file(`${name}.crt`), '--migration-tls-key', pki.file(`${name}.key`)];
}

/** The address clients use for a vcpud serving on 127.0.0.1: localhost, the name its server certificate carries, and its port. */
export const localhostTarget = (d: VcpudProcess): string => `localhost:${d.serving.api.split(':').pop()}`;

/** A migration destination serving mTLS that allows ORCHESTRATOR and MIGRATOR (issue both first), with `extra` arguments. */
export const startMigrationDestination = (pki: Pki, extra: string[] = []): Promise<VcpudProcess> =>
  startVcpud([...mtlsServeArgs(pki, [ORCHESTRATOR, MIGRATOR]), ...extra]);

/** A migration source dialling destinations as MIGRATOR, with `extra` arguments. */
export const startMigrationSource = (pki: Pki, extra: string[] = []): Promise<VcpudProcess> => startVcpud([...migrationDialArgs(pki, MIGRATOR), ...extra]);
