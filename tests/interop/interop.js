// Talks to a keybroker over its Unix socket with msgpack5rpc, a stock
// MessagePack-RPC client, and prints what it saw as one JSON document.
//
// usage: node interop.js SOCKET KEY_NAME PY_CIPHERTEXT_BASE64
//
// Binary fields go out as Node Buffers, which msgpack5 encodes as msgpack
// bin (what the broker requires); a JS string goes out as msgpack str.
'use strict';

const net = require('net');
const Session = require('msgpack5rpc');

const [socketPath, keyName, pyCiphertextB64] = process.argv.slice(2);

function call(session, method, params) {
  // Every keybroker method takes exactly one map; the error is a map with code.
  return new Promise((resolve) => {
    session.request(method, [params], (error, result) => resolve({ error, result }));
  });
}

function b64(value) {
  return Buffer.isBuffer(value) ? value.toString('base64') : null;
}

async function main() {
  const sock = net.createConnection(socketPath);
  await new Promise((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  const session = new Session();
  session.attach(sock, sock);
  const out = {};

  out.ping = (await call(session, 'ping', {})).result;
  out.created = (await call(session, 'key.create', { name: keyName, type: 'aes256-gcm' })).result;
  out.created.id = b64(out.created.id);

  const plaintext = Buffer.from([0, 1, 2, 255, 254, 0x68, 0x69]);
  const aad = Buffer.from('order 42');
  const sealed = await call(session, 'encrypt', { key: keyName, plaintext, aad });
  out.encrypted = { error: sealed.error, version: sealed.result.version,
    ciphertext: b64(sealed.result.ciphertext) };
  const opened = await call(session, 'decrypt', { ciphertext: sealed.result.ciphertext, aad });
  out.decrypted = { error: opened.error, key: opened.result.key, plaintext: b64(opened.result.plaintext) };

  const fromPython = await call(session, 'decrypt', { ciphertext: Buffer.from(pyCiphertextB64, 'base64') });
  out.from_python = { error: fromPython.error, plaintext: b64(fromPython.result && fromPython.result.plaintext) };

  // Errors come back as maps carrying the protocol's code.
  out.not_found = (await call(session, 'key.get', { name: 'interop/absent' })).error;
  out.wrong_aad = (await call(session, 'decrypt', { ciphertext: sealed.result.ciphertext,
    aad: Buffer.from('other') })).error;
  // A JS string is msgpack str, not bin: the broker says so rather than guessing.
  out.str_plaintext = (await call(session, 'encrypt', { key: keyName, plaintext: 'text' })).error;

  // Pipelined: many requests in flight on one connection, matched by msgid.
  const many = await Promise.all(Array.from({ length: 20 }, (_, i) =>
    call(session, 'encrypt', { key: keyName, plaintext: Buffer.from(`item ${i}`) })));
  const reopened = await Promise.all(many.map((r) => call(session, 'decrypt', { ciphertext: r.result.ciphertext })));
  out.pipelined = reopened.map((r) => r.result.plaintext.toString());

  session.detach();
  sock.end();
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`interop: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
