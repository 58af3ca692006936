/**
 * MigrateVm's client side: where the VM goes and how the source reaches it. A unix: destination is
 * plaintext; a TCP one needs TLS client credentials, from the request or else from the
 * --migration-tls-* files. The transfer itself is migration-service.ts's.
 */
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { unixSocketPath } from '../../address';
import { invalidArgument } from '../../errors';
import type { MigrateVmRequest__Output } from '../../api/generated/vcpud/v1/MigrateVmRequest';
import type { DestinationTarget } from './migration-service';

/** The --migration-tls-* files: default client credentials for TCP destinations. */
export interface MigrationTlsFiles {
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

/** Control-channel messages carry snapshot-sized payloads. */
const MAX_MESSAGE_BYTES = 64 << 20;

/** The destination of a MigrateVm request with its channel credentials, or INVALID_ARGUMENT naming the field. */
export function migrationDestination(req: MigrateVmRequest__Output, configuredTls?: MigrationTlsFiles): DestinationTarget {
  const dest = req.destination.trim();
  if (!dest)
    throw invalidArgument('destination is required', [
      { rule: 'required', field: 'destination', message: 'the destination vcpud address: host:port, unix:/path or /path' },
    ]);
  const options: grpc.ChannelOptions = { 'grpc.max_send_message_length': MAX_MESSAGE_BYTES, 'grpc.max_receive_message_length': MAX_MESSAGE_BYTES };
  const fromRequest = req.tls && (req.tls.caPem.length || req.tls.certPem.length || req.tls.keyPem.length);
  const socket = destinationSocket(dest);
  if (socket !== undefined) {
    if (fromRequest)
      throw invalidArgument('tls applies to TCP destinations; a unix socket is plaintext', [
        { rule: 'tls.unix', field: 'tls', message: 'drop tls for a unix: destination' },
      ]);
    return { target: `unix:${socket}`, creds: grpc.credentials.createInsecure(), options };
  }
  const file = (f?: string) => (f ? fs.readFileSync(f) : null);
  let ca: Buffer | null, cert: Buffer | null, key: Buffer | null;
  if (fromRequest) {
    const t = req.tls as NonNullable<MigrateVmRequest__Output['tls']>;
    [ca, cert, key] = [t.caPem.length ? t.caPem : null, t.certPem.length ? t.certPem : null, t.keyPem.length ? t.keyPem : null];
  } else if (configuredTls) {
    [ca, cert, key] = [file(configuredTls.caFile), file(configuredTls.certFile), file(configuredTls.keyFile)];
  } else {
    throw invalidArgument(
      `a TCP destination (${dest}) needs TLS client credentials: MigrateVmRequest.tls, or --migration-tls-ca/--migration-tls-cert/--migration-tls-key`,
      [{ rule: 'tls.required', field: 'tls', message: 'give ca_pem (and cert_pem/key_pem for mTLS), or configure --migration-tls-*' }],
    );
  }
  if (!cert !== !key) throw invalidArgument('cert_pem and key_pem go together', [{ rule: 'tls.pair', field: 'tls', message: 'give both or neither' }]);
  if (req.tls?.serverName) options['grpc.ssl_target_name_override'] = req.tls.serverName;
  return { target: dest, creds: grpc.credentials.createSsl(ca, key, cert), options, tls: { ca, cert, key, serverName: req.tls?.serverName || undefined } };
}

/** The destination's socket path when it names one (unix:PATH or a bare path: src/address.ts), else undefined. */
function destinationSocket(dest: string): string | undefined {
  try {
    return unixSocketPath(dest);
  } catch (e) {
    throw invalidArgument(`destination: ${(e as Error).message}`, [{ rule: 'address', field: 'destination', message: (e as Error).message }]);
  }
}
