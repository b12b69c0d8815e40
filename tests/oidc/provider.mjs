// A real OpenID Provider for Chaperone's end-to-end tests: oidc-provider (OpenID certified),
// on 127.0.0.1, with test clients and users in groups. Commands:
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
//   node provider.mjs sign ISSUER USER JWKS_FILE CLAIMS_JSON
//                                            print an ID token for USER signed with the
//                                            provider's own first key, with CLAIMS_JSON merged
//                                            over the usual claims (e.g. a future nbf).
//   node provider.mjs approve ISSUER CODE USER
//                                            approve a device login (the user code chaperone
//                                            run --login shows) as USER, through the pages.
//
// Clients: chaperone (public: authorization code, device code, refresh token), other-app
// (confidential).
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
const SERVICE_GROUPS = { 'etl-bot': ['readers', 'services'] };
const DEVICE_CODE = 'urn:ietf:params:oauth:grant-type:device_code';
const CLIENTS = [
  {
    client_id: 'chaperone',
    token_endpoint_auth_method: 'none',
    redirect_uris: [REDIRECT],
    grant_types: ['authorization_code', 'refresh_token', DEVICE_CODE],
    response_types: ['code'],
  },
  {
    // A service agent: client credentials, groups in its JWT access tokens.
    client_id: 'etl-bot',
    client_secret: 'etl-bot-secret',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
  },
  {
    client_id: 'other-app',
    client_secret: 'other-app-secret',
    redirect_uris: [REDIRECT],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
  },
];

// The key leaves the generator as PEM and is read back before the JWK export. Exporting the
// generator's own KeyObject can deadlock Node 20: a garbage collection during the export runs
// the finished generation job's destructor, which takes the key's lock the export holds (seen
// as a `node provider.mjs keys` stuck in futex_wait, stalling a whole test run).
function keys(kid = randomUUID()) {
  const { privateKey } = generateKeyPairSync('rsa', {
    modulusLength: 2048,
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
    publicKeyEncoding: { type: 'spki', format: 'pem' },
  });
  const jwk = createPrivateKey(privateKey).export({ format: 'jwk' });
  return { keys: [{ ...jwk, kid, alg: 'RS256', use: 'sig' }] };
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
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
      clientCredentials: { enabled: true },
      // Client-credentials tokens as JWTs (RFC 9068) for the audience chaperone checks.
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:chaperone',
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({ scope: 'groups', audience: 'chaperone', accessTokenFormat: 'jwt', accessTokenTTL: ttl }),
      },
    },
    extraTokenClaims: async (ctx, token) => (token.kind === 'ClientCredentials'
      ? { groups: SERVICE_GROUPS[token.clientId] || [] } : undefined),
    pkce: { required: () => false },
    // Refresh tokens for the device login, which asks for offline_access.
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
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

const FORM = 'application/x-www-form-urlencoded';

// Hidden inputs and the action of the form with id `id` on an HTML page.
function form(html, id) {
  const start = html.indexOf(`id="${id}"`);
  if (start < 0) return undefined;
  const body = html.slice(start, html.indexOf('</form>', start));
  const fields = {};
  for (const m of body.matchAll(/<input type="hidden" name="([^"]+)" value="([^"]*)"/g)) {
    fields[m[1]] = m[2];
  }
  const action = /action="([^"]+)"/.exec(html.slice(html.lastIndexOf('<form', start)))[1];
  return { action, fields };
}

// Follow the provider's pages as USER would from `url`: redirects, device code forms, login,
// consent. Returns the final redirect to REDIRECT (a code), or the last page's HTML.
async function walk(b, issuer, start, user, userCode) {
  let url = start;
  let page; // a page a POST answered with directly, to handle without fetching
  for (let step = 0; step < 16; step += 1) {
    let html = page;
    page = undefined;
    if (html === undefined) {
      const res = await b.go(url);
      const location = res.headers.get('location');
      if (location && location.startsWith(REDIRECT)) return { location };
      if (location) { url = new URL(location, issuer).href; continue; }
      html = await res.text();
    }
    let post;
    const input = form(html, 'op.deviceInputForm');
    const confirm = form(html, 'op.deviceConfirmForm');
    if (input) post = { action: input.action, body: { ...input.fields, user_code: userCode } };
    else if (confirm) post = { action: confirm.action, body: confirm.fields };
    else if (html.includes('name="login"')) post = { action: url, body: { prompt: 'login', login: user, password: 'any' } };
    else if (html.includes('name="prompt" value="consent"') || html.includes('Authorize')) post = { action: url, body: { prompt: 'consent' } };
    else return { html };
    const r = await b.go(new URL(post.action, issuer).href, {
      method: 'POST', headers: { 'content-type': FORM }, body: new URLSearchParams(post.body),
    });
    const next = r.headers.get('location');
    if (next && next.startsWith(REDIRECT)) return { location: next };
    if (next) url = new URL(next, issuer).href;
    else page = await r.text();
  }
  throw new Error('the login pages did not finish');
}

async function token(issuer, user, client = 'chaperone') {
  const auth = new URL(`${issuer}/auth`);
  auth.search = new URLSearchParams({
    client_id: client, response_type: 'code', scope: 'openid email groups',
    redirect_uri: REDIRECT, nonce: randomUUID(), state: 'test',
  });
  const { location } = await walk(new Browser(), issuer, auth.href, user);
  const code = location && new URL(location).searchParams.get('code');
  if (!code) throw new Error(`no code: ${location}`);
  const headers = { 'content-type': FORM };
  const body = new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: REDIRECT });
  if (client === 'chaperone') body.set('client_id', client);
  else headers.authorization = `Basic ${Buffer.from(`${client}:${client}-secret`).toString('base64')}`;
  const tok = await fetch(`${issuer}/token`, { method: 'POST', headers, body });
  const json = await tok.json();
  if (!json.id_token) throw new Error(`no id_token: ${JSON.stringify(json)}`);
  return json.id_token;
}

async function approve(issuer, userCode, user) {
  const { html } = await walk(new Browser(), issuer, `${issuer}/device`, user, userCode);
  if (!html || !html.includes('Sign-in Success')) throw new Error(`device approval failed: ${html}`);
}

function b64url(data) {
  return Buffer.from(typeof data === 'string' ? data : JSON.stringify(data)).toString('base64url');
}

// An RS256 JWT of `claims`, signed with `jwk` (a private JWK with a kid).
function sign(jwk, claims) {
  const head = b64url({ alg: 'RS256', typ: 'JWT', kid: jwk.kid });
  const body = b64url(claims);
  const signer = createSign('RSA-SHA256');
  signer.update(`${head}.${body}`);
  return `${head}.${body}.${signer.sign(createPrivateKey({ key: jwk, format: 'jwk' })).toString('base64url')}`;
}

function claimsFor(issuer, user) {
  const now = Math.floor(Date.now() / 1000);
  return { iss: issuer, aud: 'chaperone', sub: user, iat: now, exp: now + 600, ...USERS[user] };
}

function forge(issuer, user) {
  return sign(keys('forged').keys[0], claimsFor(issuer, user));
}

function signWith(issuer, user, jwksFile, extra) {
  const jwk = JSON.parse(readFileSync(jwksFile, 'utf8')).keys[0];
  const claims = { ...claimsFor(issuer, user), ...JSON.parse(extra) };
  for (const [k, v] of Object.entries(claims)) if (v === null) delete claims[k];
  return sign(jwk, claims);
}

const [cmd, ...args] = process.argv.slice(2);
try {
  switch (cmd) {
    case 'serve': await serve(args[0], args[1]); break;
    case 'keys': console.log(JSON.stringify(keys(args[0]))); break;
    case 'token': console.log(await token(args[0], args[1], args[2])); break;
    case 'forge': console.log(forge(args[0], args[1])); break;
    case 'approve': await approve(args[0], args[1], args[2]); break;
    case 'sign': console.log(signWith(args[0], args[1], args[2], args[3])); break;
    default: throw new Error(`unknown command ${cmd}`);
  }
} catch (e) {
  console.error(e.stack || String(e));
  process.exit(1);
}
