/** A throwaway PKI made with openssl: a CA, a server certificate for localhost, and client certificates. */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';

export interface Pki {
  file(name: string): string;
  pem(name: string): Buffer;
  /** Issues `${name}.key` / `${name}.crt` signed by the CA, with `subject` and extension lines `ext`. */
  issue(name: string, subject: string, ext: string): void;
  /** Client credentials trusting the CA, presenting `${name}` when given. */
  clientCreds(name?: string): grpc.ChannelCredentials;
}

export function makePki(dir: string): Pki {
  fs.mkdirSync(dir, { recursive: true });
  const file = (name: string) => path.join(dir, name);
  const pem = (name: string) => fs.readFileSync(file(name));
  const openssl = (...args: string[]) => execFileSync('/usr/bin/openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(
    'req',
    '-x509',
    ...ec,
    '-keyout',
    'ca.key',
    '-out',
    'ca.crt',
    '-days',
    '2',
    '-subj',
    '/CN=vcpud test CA',
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  );
  const issue = (name: string, subject: string, ext: string) => {
    fs.writeFileSync(file(`${name}.ext`), ext);
    openssl('req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', subject);
    openssl(
      'x509',
      '-req',
      '-in',
      `${name}.csr`,
      '-CA',
      'ca.crt',
      '-CAkey',
      'ca.key',
      '-CAcreateserial',
      '-days',
      '2',
      '-out',
      `${name}.crt`,
      '-extfile',
      `${name}.ext`,
    );
  };
  issue('server', '/CN=vcpud', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  return {
    file,
    pem,
    issue,
    clientCreds: (name?: string) =>
      name ? grpc.credentials.createSsl(pem('ca.crt'), pem(`${name}.key`), pem(`${name}.crt`)) : grpc.credentials.createSsl(pem('ca.crt')),
  };
}
