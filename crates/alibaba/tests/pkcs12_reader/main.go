// Reads a kmsgate-issued Alibaba ClientKey file the way the Go instance SDK does (golang.org/x/crypto/pkcs12,
// which only knows legacy PKCS#12) and signs a message with its key, so the Rust test can verify the signature
// against the public key the gateway registered.
//
// Usage: pkcs12_reader <clientKey_....json> <password file> <message>
// Prints one JSON object: {"key_id", "pem_blocks", "pem_types", "cert_cn", "signature"} (signature base64,
// RSASSA-PKCS1-v1_5 over SHA-256 of the message).
package main

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"

	"golang.org/x/crypto/pkcs12"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 4 {
		fail("usage: pkcs12_reader <client key json> <password file> <message>")
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail("read client key file: %v", err)
	}
	var file struct {
		KeyId          string
		PrivateKeyData string
	}
	if err := json.Unmarshal(raw, &file); err != nil {
		fail("parse client key file: %v", err)
	}
	password, err := os.ReadFile(os.Args[2])
	if err != nil {
		fail("read password file: %v", err)
	}
	pfx, err := base64.StdEncoding.DecodeString(file.PrivateKeyData)
	if err != nil {
		fail("PrivateKeyData is not base64: %v", err)
	}

	// What the Go SDK calls.
	blocks, err := pkcs12.ToPEM(pfx, string(password))
	if err != nil {
		fail("pkcs12.ToPEM: %v", err)
	}
	types := []string{}
	for _, b := range blocks {
		types = append(types, b.Type)
	}
	var pemBytes []byte
	for _, b := range blocks {
		pemBytes = append(pemBytes, pem.EncodeToMemory(b)...)
	}

	// Decode wants exactly one key and one certificate.
	key, cert, err := pkcs12.Decode(pfx, string(password))
	if err != nil {
		fail("pkcs12.Decode: %v", err)
	}
	rsaKey, ok := key.(*rsa.PrivateKey)
	if !ok {
		fail("the key is not RSA")
	}
	certKey, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok || certKey.N.Cmp(rsaKey.N) != 0 || certKey.E != rsaKey.E {
		fail("the certificate does not carry the key's public half")
	}
	digest := sha256.Sum256([]byte(os.Args[3]))
	sig, err := rsa.SignPKCS1v15(rand.Reader, rsaKey, crypto.SHA256, digest[:])
	if err != nil {
		fail("sign: %v", err)
	}
	out, _ := json.Marshal(map[string]interface{}{
		"key_id":     file.KeyId,
		"pem_blocks": len(blocks),
		"pem_types":  types,
		"pem_len":    len(pemBytes),
		"cert_cn":    cert.Subject.CommonName,
		"signature":  base64.StdEncoding.EncodeToString(sig),
	})
	fmt.Println(string(out))
}
