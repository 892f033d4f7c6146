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

declare(strict_types=1);

namespace Psap;

final class EncryptionService
{
    public const SECRETBOX = 'secretbox';
    public const AES_256_GCM = 'aes-256-gcm';

    /** @var array<int, array{cipher: string, key: string}> */
    private array $keys = [];
    private int $current;

    /**
     * @param array<string, string> $keys version ("v2") => key setting text ("<hex>" or "aes-256-gcm:<hex>")
     */
    public function __construct(array $keys, string $currentVersion)
    {
        foreach ($keys as $version => $text) {
            $this->keys[self::versionNumber($version)] = self::parseKey($text, $version);
        }
        $this->current = self::versionNumber($currentVersion);
    }

    /** @param array<string, string>|null $env */
    public static function fromEnvironment(?array $env = null): self
    {
        $env ??= getenv();
        $keys = [];
        foreach ($env as $name => $value) {
            if ($name === 'LIBSODIUM_ENCRYPTION_KEY') {
                $keys['v1'] = $value;
            } elseif (preg_match('/^LIBSODIUM_ENCRYPTION_KEY_V([1-9][0-9]?)$/', $name, $m)) {
                $keys['v' . $m[1]] = $value;
            }
        }
        return new self($keys, $env['LIBSODIUM_ENCRYPTION_KEY_VERSION'] ?? 'v1');
    }

    /** The cipher of a configured version, or null. */
    public function cipherOf(string $version): ?string
    {
        return $this->keys[self::versionNumber($version)]['cipher'] ?? null;
    }

    public function encrypt(string $plaintext, ?string $context = null): string
    {
        $v = $this->current;
        $k = $this->key($v);
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

    public function decrypt(string $envelope, ?string $context = null): string
    {
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
        if (!isset($this->keys[$v])) {
            throw new \RuntimeException("no key is configured for version v$v");
        }
        return $this->keys[$v];
    }

    private static function versionNumber(string $version): int
    {
        if (!preg_match('/^v([1-9][0-9]?)$/', $version, $m)) {
            throw new \RuntimeException('key versions are written v1 to v99');
        }
        return (int) $m[1];
    }

    /** @return array{cipher: string, key: string} */
    private static function parseKey(string $text, string $version): array
    {
        $text = trim($text);
        $cipher = self::SECRETBOX;
        if (str_contains($text, ':')) {
            [$cipher, $text] = array_map('trim', explode(':', $text, 2));
            if ($cipher !== self::SECRETBOX && $cipher !== self::AES_256_GCM) {
                throw new \RuntimeException("the key of $version names an unknown cipher");
            }
        }
        if (!preg_match('/^[0-9a-fA-F]{64}$/', $text)) {
            throw new \RuntimeException("the key of $version is not 64 hexadecimal digits");
        }
        return ['cipher' => $cipher, 'key' => hex2bin($text)];
    }
}
