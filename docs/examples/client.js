// A Node.js application talking to its keybroker sidecar.
//
// keybroker speaks plain MessagePack-RPC, so a stock client works:
//   npm install msgpack5rpc@1.1.0
// Run: KEYBROKER_SOCKET=/run/keybroker/keybroker.sock node client.js
//
// Assumes the key myapp/records (aes256-gcm) exists and that this process's
// uid holds the "app" role on myapp/* (docs/examples/app-policy.toml).
//
// Two rules of the protocol to keep in mind:
// - every method takes exactly one map: params = [ { ... } ];
// - binary fields (plaintext, ciphertext, aad, ...) must be msgpack bin,
//   which is what a Buffer encodes to. A JS string is msgpack str, and the
//   broker refuses it with invalid_argument.
'use strict';

const net = require('net');
const Session = require('msgpack5rpc');

const SOCKET = process.env.KEYBROKER_SOCKET || '/run/keybroker/keybroker.sock';

class BrokerError extends Error {
  constructor(error) {
    super(`${error.code}: ${error.message}`);
    this.code = error.code; // the protocol's error code, e.g. "not_found"
    this.details = error.details || {};
  }
}

function connect(path) {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection(path);
    sock.once('error', reject);
    sock.once('connect', () => {
      const session = new Session();
      session.attach(sock, sock);
      const call = (method, params) => new Promise((ok, fail) => {
        session.request(method, [params], (error, result) => {
          if (error) fail(new BrokerError(error));
          else ok(result);
        });
      });
      const close = () => { session.detach(); sock.end(); };
      resolve({ call, close });
    });
  });
}

async function main() {
  const kb = await connect(SOCKET);
  try {
    const me = await kb.call('whoami', {});
    console.log('connected as', me.principal);

    // Encrypt a record, bound to its row by the aad.
    const aad = Buffer.from('customer:42');
    const sealed = await kb.call('encrypt', {
      key: 'myapp/records', plaintext: Buffer.from('4111 1111 1111 1111'), aad,
    });
    const opened = await kb.call('decrypt', { ciphertext: sealed.ciphertext, aad });
    console.log('round trip:', opened.plaintext.toString(), 'with', opened.key, 'v' + opened.version);

    // Requests may be pipelined on one connection; replies are matched by id.
    const items = ['a', 'b', 'c'].map((s) => Buffer.from(s));
    const many = await Promise.all(items.map((plaintext) => kb.call('encrypt', { key: 'myapp/records', plaintext })));
    console.log('pipelined', many.length, 'encryptions');

    // Errors carry the protocol's code.
    try {
      await kb.call('key.get', { name: 'myapp/missing' });
    } catch (err) {
      if (!(err instanceof BrokerError) || err.code !== 'not_found') throw err;
      console.log('refused:', err.code);
    }
  } finally {
    kb.close();
  }
}

main().catch((err) => {
  console.error(err.message || err);
  process.exit(1);
});
