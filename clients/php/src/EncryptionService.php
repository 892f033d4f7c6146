<?php
// The application's side of psap_encrypt's envelopes: the same format, both ciphers, with and
// without a context. A drop-in for the dispatch application's EncryptionService.
//
//   v<N>: + base64(nonce(24) || crypto_secretbox(plaintext))            cipher secretbox (sodium)
//   v<N>: + base64(nonce(12) || AES-256-GCM ciphertext || tag(16))      cipher aes-256-gcm (OpenSSL)
//
// Keys come from the environment exactly as before, one variable per version:
//   LIBSODIUM_ENCRYPTION_KEY      v1
//   LIBSODIUM_ENCRYPTION_KEY_V2   v2   (..._V99)
//   LIBSODIUM_ENCRYPTION_KEY_VERSION   the version new values use (v2)
// A value is 64 hex digits (a secretbox key, as before) or "aes-256-gcm:" followed by 64 hex
// digits: the same spelling as the server's psap.key_vN settings and the cipher field of the key
// command's lines, so one version never means two ciphers.
//
// Errors are RuntimeException with a message that never contains a key, a plaintext or a
// ciphertext. "wrong key or corrupt data" covers a wrong key, a modified value and a wrong context.
// Parameters that carry keys, plaintext, ciphertext or a context are #[\SensitiveParameter], so
// stack traces (zend.exception_ignore_args = 0, error trackers) do not show them; the object
// does not show its keys to var_dump/print_r and cannot be serialized or cloned.
//
// As the server does: an empty context is no context; an empty key variable is no key; a key
// value may be surrounded by ASCII whitespace. Unlike the server, one malformed key fails the
// whole service (it starts with every key or none). fingerprintOf() gives the fingerprint
// psap_keys() shows, so a deployment can check that both sides hold the same key and cipher for
// each version. OpenSSL here is the system's: for CJIS, aes-256-gcm on the application's side
// needs OpenSSL's FIPS provider (docs/compliance.md).

declare(strict_types=1);

namespace Psap;

final class EncryptionService
{
    public const SECRETBOX = 'secretbox';
    public const AES_256_GCM = 'aes-256-gcm';

    /**
     * Each service's keys (version => cipher and key), outside the object, so that var_export,
     * print_r, var_dump, (array) and get_object_vars of it cannot show them.
     * @var \WeakMap<self, array<int, array{cipher: string, key: string}>>|null
     */
    private static ?\WeakMap $keyrings = null;
    private int $current;

    /**
     * @param array<string, string> $keys version ("v2") => key setting text ("<hex>" or "aes-256-gcm:<hex>")
     */
    public function __construct(#[\SensitiveParameter] array $keys, string $currentVersion)
    {
        $ring = [];
        foreach ($keys as $version => $text) {
            $key = self::parseKey($text, (string) $version);
            if ($key !== null) {
                $ring[self::versionNumber((string) $version)] = $key;
            }
        }
        $this->current = self::versionNumber($currentVersion);
        self::$keyrings ??= new \WeakMap();
        self::$keyrings[$this] = $ring;
    }

    /** @param array<string, string>|null $env */
    public static function fromEnvironment(#[\SensitiveParameter] ?array $env = null): self
    {
        $env ??= getenv();
        if (isset($env['LIBSODIUM_ENCRYPTION_KEY'], $env['LIBSODIUM_ENCRYPTION_KEY_V1'])) {
            // Which one won would depend on the environment's order.
            throw new \RuntimeException('the key of v1 is set twice (LIBSODIUM_ENCRYPTION_KEY and LIBSODIUM_ENCRYPTION_KEY_V1)');
        }
        $keys = [];
        foreach ($env as $name => $value) {
            if ($name === 'LIBSODIUM_ENCRYPTION_KEY') {
                $keys['v1'] = $value;
            } elseif (preg_match('/^LIBSODIUM_ENCRYPTION_KEY_V([1-9][0-9]?)\z/', $name, $m)) {
                $keys['v' . $m[1]] = $value;
            }
        }
        return new self($keys, $env['LIBSODIUM_ENCRYPTION_KEY_VERSION'] ?? 'v1');
    }

    /** What var_dump and print_r show: versions and ciphers, never a key. */
    public function __debugInfo(): array
    {
        $shown = [];
        foreach ($this->ring() as $v => $k) {
            $shown["v$v"] = $k['cipher'];
        }
        return ['current' => "v{$this->current}", 'keys' => $shown];
    }

    public function __serialize(): array
    {
        throw new \LogicException('an EncryptionService holds keys and cannot be serialized');
    }

    public function __unserialize(array $data): void
    {
        throw new \LogicException('an EncryptionService holds keys and cannot be serialized');
    }

    private function __clone()
    {
    }

    /**
     * The fingerprint psap_keys() shows for a configured version (BLAKE2b-256 of
     * "psap_encrypt key fingerprint:" and the key, first 8 bytes in hex), or null.
     */
    public function fingerprintOf(string $version): ?string
    {
        $k = $this->ring()[self::versionNumber($version)] ?? null;
        if ($k === null) {
            return null;
        }
        return substr(bin2hex(sodium_crypto_generichash('psap_encrypt key fingerprint:' . $k['key'], '', 32)), 0, 16);
    }

    /** The cipher of a configured version, or null. */
    public function cipherOf(string $version): ?string
    {
        return $this->ring()[self::versionNumber($version)]['cipher'] ?? null;
    }

    public function encrypt(#[\SensitiveParameter] string $plaintext, #[\SensitiveParameter] ?string $context = null): string
    {
        $v = $this->current;
        $k = $this->key($v);
        if ($context === '') {
            $context = null;
        }
        if ($k['cipher'] === self::SECRETBOX) {
            if ($context !== null) {
                throw new \RuntimeException("cipher secretbox cannot bind a context (version v$v)");
            }
            $nonce = random_bytes(SODIUM_CRYPTO_SECRETBOX_NONCEBYTES);
            $sealed = $nonce . sodium_crypto_secretbox($plaintext, $nonce, $k['key']);
        } else {
            $iv = random_bytes(12);
            $tag = '';
            $ct = openssl_encrypt($plaintext, 'aes-256-gcm', $k['key'], OPENSSL_RAW_DATA, $iv, $tag, $context ?? '', 16);
            if ($ct === false) {
                throw new \RuntimeException("aes-256-gcm encryption failed (version v$v)");
            }
            $sealed = $iv . $ct . $tag;
        }
        return "v$v:" . base64_encode($sealed);
    }

    public function decrypt(#[\SensitiveParameter] string $envelope, #[\SensitiveParameter] ?string $context = null): string
    {
        if ($context === '') {
            $context = null;
        }
        if (!preg_match('/^v([1-9][0-9]?):/', $envelope, $m)) {
            throw new \RuntimeException('malformed ciphertext envelope');
        }
        $v = (int) $m[1];
        $body = substr($envelope, strlen($m[0]));
        $raw = base64_decode($body, true);
        // Canonical base64 only: a value that differs from what was written is never accepted.
        if ($raw === false || base64_encode($raw) !== $body) {
            throw new \RuntimeException('malformed ciphertext envelope');
        }
        $k = $this->key($v);
        if ($k['cipher'] === self::SECRETBOX) {
            if ($context !== null) {
                throw new \RuntimeException("cipher secretbox cannot bind a context (version v$v)");
            }
            $n = SODIUM_CRYPTO_SECRETBOX_NONCEBYTES;
            if (strlen($raw) < $n + SODIUM_CRYPTO_SECRETBOX_MACBYTES) {
                throw new \RuntimeException('malformed ciphertext envelope');
            }
            $plain = sodium_crypto_secretbox_open(substr($raw, $n), substr($raw, 0, $n), $k['key']);
        } else {
            if (strlen($raw) < 28) {
                throw new \RuntimeException('malformed ciphertext envelope');
            }
            $plain = openssl_decrypt(substr($raw, 12, -16), 'aes-256-gcm', $k['key'], OPENSSL_RAW_DATA,
                                     substr($raw, 0, 12), substr($raw, -16), $context ?? '');
        }
        if ($plain === false) {
            throw new \RuntimeException('wrong key or corrupt data');
        }
        return $plain;
    }

    /** @return array{cipher: string, key: string} */
    private function key(int $v): array
    {
        $ring = $this->ring();
        if (!isset($ring[$v])) {
            throw new \RuntimeException("no key is configured for version v$v");
        }
        return $ring[$v];
    }

    /** @return array<int, array{cipher: string, key: string}> */
    private function ring(): array
    {
        return self::$keyrings[$this] ?? [];
    }

    private static function versionNumber(string $version): int
    {
        if (!preg_match('/^v([1-9][0-9]?)\z/', $version, $m)) {
            throw new \RuntimeException('key versions are written v1 to v99');
        }
        return (int) $m[1];
    }

    /** @return array{cipher: string, key: string} */
    private static function parseKey(#[\SensitiveParameter] string $text, string $version): ?array
    {
        $space = " \t\n\r\f\v";
        $text = trim($text, $space);
        if ($text === '') {
            return null;
        }
        $cipher = self::SECRETBOX;
        if (str_contains($text, ':')) {
            [$cipher, $text] = array_map(fn ($part) => trim($part, $space), explode(':', $text, 2));
            if ($cipher !== self::SECRETBOX && $cipher !== self::AES_256_GCM) {
                throw new \RuntimeException("the key of $version names an unknown cipher");
            }
        }
        if (!preg_match('/^[0-9a-fA-F]{64}\z/', $text)) {
            throw new \RuntimeException("the key of $version is not 64 hexadecimal digits");
        }
        $key = hex2bin($text);
        sodium_memzero($text);
        return ['cipher' => $cipher, 'key' => $key];
    }
}
