// A real OpenID Provider for Chaperone's end-to-end tests: oidc-provider (OpenID certified),
// on 127.0.0.1, with test clients and users in groups. Three commands:
//
//   node provider.mjs serve PORT JWKS_FILE   serve until killed; prints "ready ISSUER" when up.
//                                            ID_TOKEN_TTL (seconds, default 600) sets ID token life.
//   node provider.mjs keys [KID]             print a fresh private JWK set (one RS256 key).
//   node provider.mjs token ISSUER USER [CLIENT]
//                                            log USER in through the provider's own login and
//                                            consent pages (authorization code flow) and print
//                                            the ID token it issues to CLIENT (default chaperone).
//   node provider.mjs forge ISSUER USER      print a token with the right claims, signed by a
//                                            key the provider never had.
//
// Users: alice (groups readers, staff), bob (writers), carol (readers; email not verified).

import {
  createPrivateKey, createSign, generateKeyPairSync, randomUUID,
} from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const USERS = {
  alice: { email: 'alice@example.com', email_verified: true, groups: ['readers', 'staff'] },
  bob: { email: 'bob@example.com', email_verified: true, groups: ['writers'] },
  carol: { email: 'carol@example.com', email_verified: false, groups: ['readers'] },
};
const REDIRECT = 'http://127.0.0.1/callback';
const CLIENTS = ['chaperone', 'other-app'].map((id) => ({
  client_id: id,
  client_secret: `${id}-secret`,
  redirect_uris: [REDIRECT],
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
}));

function keys(kid = randomUUID()) {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { keys: [{ ...privateKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' }] };
}

async function serve(port, jwksFile) {
  const issuer = `http://127.0.0.1:${port}`;
  const ttl = Number(process.env.ID_TOKEN_TTL || 600);
  const provider = new Provider(issuer, {
    clients: CLIENTS,
    jwks: JSON.parse(readFileSync(jwksFile, 'utf8')),
    async findAccount(ctx, id) {
      const user = USERS[id];
      if (!user) return undefined;
      return { accountId: id, async claims() { return { sub: id, ...user }; } };
    },
    claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
    // Put the scopes' claims in the ID token itself (the daemon sees only the ID token).
    conformIdTokenClaims: false,
    features: { devInteractions: { enabled: true } },
    pkce: { required: () => false },
    ttl: { IdToken: ttl },
  });
  provider.proxy = false;
  await new Promise((resolve) => { provider.listen(Number(port), '127.0.0.1', resolve); });
  console.log(`ready ${issuer}`);
}

// A cookie jar just big enough for the login flow.
class Browser {
  constructor() { this.cookies = new Map(); }

  async go(url, init = {}) {
    const headers = { ...(init.headers || {}) };
    if (this.cookies.size) {
      headers.cookie = [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
    }
    const res = await fetch(url, { ...init, headers, redirect: 'manual' });
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const i = pair.indexOf('=');
      this.cookies.set(pair.slice(0, i), pair.slice(i + 1));
    }
    return res;
  }
}

async function token(issuer, user, client = 'chaperone') {
  const b = new Browser();
  const auth = new URL(`${issuer}/auth`);
  auth.search = new URLSearchParams({
    client_id: client, response_type: 'code', scope: 'openid email groups',
    redirect_uri: REDIRECT, nonce: randomUUID(), state: 'test',
  });
  let url = auth.href;
  for (let step = 0; step < 12; step += 1) {
    const res = await b.go(url);
    const location = res.headers.get('location');
    if (location && location.startsWith(REDIRECT)) {
      const code = new URL(location).searchParams.get('code');
      if (!code) throw new Error(`no code: ${location}`);
      const tok = await fetch(`${issuer}/token`, {
        method: 'POST',
        headers: {
          'content-type': 'application/x-www-form-urlencoded',
          authorization: `Basic ${Buffer.from(`${client}:${client}-secret`).toString('base64')}`,
        },
        body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: REDIRECT }),
      });
      const body = await tok.json();
      if (!body.id_token) throw new Error(`no id_token: ${JSON.stringify(body)}`);
      return body.id_token;
    }
    if (location) { url = new URL(location, issuer).href; continue; }
    // An interaction page: answer it as the user would (log in, then consent).
    const html = await res.text();
    const prompt = html.includes('name="login"') ? 'login' : 'consent';
    const form = prompt === 'login' ? { prompt, login: user, password: 'any' } : { prompt };
    const post = await b.go(url, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(form),
    });
    const next = post.headers.get('location');
    if (!next) throw new Error(`interaction ${prompt} gave ${post.status}: ${await post.text()}`);
    url = new URL(next, issuer).href;
  }
  throw new Error('login flow did not finish');
}

function b64url(data) {
  return Buffer.from(typeof data === 'string' ? data : JSON.stringify(data)).toString('base64url');
}

function forge(issuer, user) {
  const jwk = keys('forged').keys[0];
  const now = Math.floor(Date.now() / 1000);
  const head = b64url({ alg: 'RS256', typ: 'JWT', kid: jwk.kid });
  const body = b64url({
    iss: issuer, aud: 'chaperone', sub: user, iat: now, exp: now + 600, ...USERS[user],
  });
  const signer = createSign('RSA-SHA256');
  signer.update(`${head}.${body}`);
  return `${head}.${body}.${signer.sign(createPrivateKey({ key: jwk, format: 'jwk' })).toString('base64url')}`;
}

const [cmd, ...args] = process.argv.slice(2);
try {
  switch (cmd) {
    case 'serve': await serve(args[0], args[1]); break;
    case 'keys': console.log(JSON.stringify(keys(args[0]))); break;
    case 'token': console.log(await token(args[0], args[1], args[2])); break;
    case 'forge': console.log(forge(args[0], args[1])); break;
    default: throw new Error(`unknown command ${cmd}`);
  }
} catch (e) {
  console.error(e.stack || String(e));
  process.exit(1);
}
